"""Generic Diffusion Framework (GDF), upstream Stable Cascade's diffusion toolkit: every part speaks logSNR.

Built for the released models as
`GDF(CosineSchedule(clamp_range=[0.0001, 0.9999]), VPScaler(), EpsilonTarget(), CosineTNoiseCond(), P2LossWeight())`.
"""
from .gdf import GDF
from .loss_weights import (AdaptiveLossWeight, BaseLossWeight, ComposedLossWeight, ConstantLossWeight,
                           DebiasedLossWeight, MinSNRLossWeight, MinSNRPlusOneLossWeight, P2LossWeight,
                           SechLossWeight, SigmoidLossWeight, SNRLossWeight, SNRPlusOneLossWeight,
                           TruncatedSNRLossWeight)
from .noise_conditions import (BaseNoiseCond, CosineTNoiseCond, DiscreteNoiseCond, EDMNoiseCond, EDMSigmaNoiseCond,
                               LogSNRNoiseCond, PiecewiseLinearNoiseCond, RectifiedFlowsNoiseCond, SigmoidNoiseCond,
                               StableDiffusionNoiseCond)
from .samplers import DDIMSampler, DDPMSampler, LCMSampler, SimpleSampler
from .scalers import BaseScaler, LERPScaler, VPScaler
from .schedulers import (AdaptiveTrainSchedule, BaseSchedule, CosineSchedule, CosineSchedule2, EDMSampleSchedule,
                         EDMTrainSchedule, InterpolatedSchedule, LinearSchedule, PiecewiseLinearSchedule,
                         RectifiedFlowsSchedule, SqrtSchedule, StableDiffusionSchedule)
from .targets import EpsilonTarget, RectifiedFlowsTarget, VTarget, X0Target

__all__ = [
    "GDF",
    "BaseSchedule", "CosineSchedule", "CosineSchedule2", "SqrtSchedule", "RectifiedFlowsSchedule",
    "EDMSampleSchedule", "EDMTrainSchedule", "LinearSchedule", "PiecewiseLinearSchedule", "StableDiffusionSchedule",
    "AdaptiveTrainSchedule", "InterpolatedSchedule",
    "BaseScaler", "VPScaler", "LERPScaler",
    "EpsilonTarget", "X0Target", "VTarget", "RectifiedFlowsTarget",
    "BaseNoiseCond", "CosineTNoiseCond", "EDMNoiseCond", "SigmoidNoiseCond", "LogSNRNoiseCond", "EDMSigmaNoiseCond",
    "RectifiedFlowsNoiseCond", "PiecewiseLinearNoiseCond", "StableDiffusionNoiseCond", "DiscreteNoiseCond",
    "BaseLossWeight", "ComposedLossWeight", "ConstantLossWeight", "SNRLossWeight", "P2LossWeight",
    "SNRPlusOneLossWeight", "MinSNRLossWeight", "MinSNRPlusOneLossWeight", "TruncatedSNRLossWeight",
    "SechLossWeight", "DebiasedLossWeight", "SigmoidLossWeight", "AdaptiveLossWeight",
    "SimpleSampler", "DDIMSampler", "DDPMSampler", "LCMSampler",
]
