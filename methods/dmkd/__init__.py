"""DMKD package: hyperparameters, model (sparse top-K dispatch), preservation, specialization, method."""

from methods.dmkd.decentralized import DecentralizedDMKD
from methods.dmkd.hparams import DMKDParams
from methods.dmkd.method import DMKD
from methods.dmkd.model import DMKDModel

__all__ = ["DMKD", "DMKDModel", "DMKDParams", "DecentralizedDMKD"]
