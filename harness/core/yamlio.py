"""YAML for user files: plain data only, no aliases (a few hundred bytes of aliases can expand to
gigabytes), no key written twice in one mapping (YAML parsers keep the last one silently, so an
earlier ``methods:`` or ``seeds:`` would vanish), bounded size, and every problem one UserError line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.core.errors import UserError

MAX_YAML_BYTES = 1 << 20  # a suite, ablation or tuned-settings file is a few KB


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases instead of expanding them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A mapping whose keys are all distinct, at every level; a repeated key is an error naming
        both lines."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, first, again) -> None:
        super().__init__(None, None, f"key {key!r} appears twice", again)
        self.key, self.first_line, self.again_line = key, first.line + 1, again.line + 1


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text from ``where`` (a file name, for the message)."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except DuplicateKeyError as e:
        raise UserError(f"{where}: key {e.key!r} appears twice in one mapping (lines {e.first_line} and "
                        f"{e.again_line}); only the last would count", "write each key once") from None
    except yaml.constructor.ConstructorError as e:
        if "aliases" in str(e.problem):
            mark = e.problem_mark
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{where}: YAML aliases are not allowed{at}",
                            "write the values out instead of &anchor/*alias") from None
        raise UserError(f"{where} is not valid YAML ({e.problem})", "fix the YAML syntax") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where} is not valid YAML{at}", "fix the YAML syntax") from None


def load_yaml_file(path: str | Path, what: str = "file") -> Any:
    """Read and parse a user's YAML file: missing, too big, not UTF-8 or not YAML -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found", "pass an existing YAML file")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise UserError(f"{path} is {size} bytes; a {what} is at most {MAX_YAML_BYTES} bytes",
                            "pass the right file")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})", "check the path and its permissions") from None
    return load_yaml_text(text, str(path))
