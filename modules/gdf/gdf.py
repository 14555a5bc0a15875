"""The generic diffusion framework: a schedule, an input scaler, a target, a noise condition and a loss weight,
all speaking logSNR, combined into training (`diffuse`) and sampling (`sample`)."""
import torch

from .cfg import guidance_scale, guide, pair_inputs
from .noise import randn
from .samplers import DDPMSampler, takes_scalers


class GDF:
    """Swap any part to move between DDPM/DDIM, EDM, v-prediction or rectified flows.

    `offset_noise` adds that much per-channel constant noise to eps in training (Guttenberg 2023, "Diffusion
    with Offset Noise"), so the model can change an image's mean brightness.
    """

    def __init__(self, schedule, input_scaler, target, noise_cond, loss_weight, offset_noise=0):
        self.schedule = schedule
        self.input_scaler = input_scaler
        self.target = target
        self.noise_cond = noise_cond
        self.loss_weight = loss_weight
        self.offset_noise = offset_noise

    def setup_limits(self, stretch_max=True, stretch_min=True, shift=1):
        """Stretch the scaler so the schedule's ends are exactly pure noise / clean (see `BaseScaler`)."""
        return self.input_scaler.setup_limits(self.schedule, stretch_max, stretch_min, shift)

    def input_scalers(self, logSNR, ndim):
        """(a, b) for `logSNR` (one per sample, or one for all), shaped to broadcast over an `ndim`-d batch."""
        a, b = self.input_scaler(logSNR)
        if a.dim() == 1:
            shape = (-1,) + (1,) * (ndim - 1)
            a, b = a.view(shape), b.view(shape)
        return a, b

    def diffuse(self, x0, epsilon=None, t=None, shift=1, loss_shift=1, offset=None, generator=None):
        """Noise `x0` (B x ...) at times `t` (random if None) for training.

        Returns (x_t, epsilon, target, logSNR, noise_cond, loss_weight). `generator`: a torch.Generator or one
        per sample, for the noise and the offset noise.
        """
        if epsilon is None:
            epsilon = randn(x0.shape, generator, x0.device, x0.dtype)
        if self.offset_noise > 0:
            if offset is None:
                offset = randn((*x0.shape[:2], *[1] * (x0.dim() - 2)), generator, x0.device, x0.dtype)  # B, C, 1, 1
            epsilon = epsilon + offset * self.offset_noise
        logSNR = self.schedule(x0.size(0) if t is None else t, shift=shift).to(x0.device)
        a, b = self.input_scalers(logSNR, x0.dim())
        target = self.target(x0, epsilon, logSNR, a, b)
        noised = x0 * a + epsilon * b
        return noised, epsilon, target, logSNR, self.noise_cond(logSNR), self.loss_weight(logSNR, shift=loss_shift)

    def undiffuse(self, x, logSNR, pred, scalers=None):
        """The (x0, epsilon) that the model's prediction `pred` at `x` = x_t implies (`scalers`: logSNR's (a, b),
        when already computed)."""
        a, b = self.input_scalers(logSNR, x.dim()) if scalers is None else scalers
        return self.target.x0(x, pred, logSNR, a, b), self.target.epsilon(x, pred, logSNR, a, b)

    def sample(self, model, model_inputs, shape, unconditional_inputs=None, sampler=None, schedule=None,
               t_start=1.0, t_end=0.0, timesteps=20, x_init=None, cfg=3.0, cfg_t_stop=None, cfg_t_start=None,
               cfg_rho=0.7, sampler_params=None, shift=1, device=None, generator=None):
        """Generator yielding (x0, x, pred) after each of `timesteps` steps from t_start to t_end.

        The model is called as `model(x, noise_cond, **model_inputs)`. With `cfg` (a number, or a pair
        interpolated over t) and t inside [cfg_t_stop, cfg_t_start], cond and uncond inputs run as one doubled
        batch (see `cfg.pair_inputs`); elsewhere the model gets the undoubled batch. Start from `x_init`
        (kept in its device and dtype) or from noise on `device` (float32). `generator`: a torch.Generator or one
        per sample, for the initial noise and every sampler step, so image i of a batch is the image its
        generator gives alone. `.send({...})` may override cfg, cfg_rho, sampler, model_inputs (undoubled),
        and x (or x_init, upstream's name for it) for the next steps. The last step at t_end = 0 still adds
        b(0)·noise: take its x0.
        """
        sampler = DDPMSampler(self) if sampler is None else sampler
        sampler_params = {} if sampler_params is None else sampler_params
        schedule = self.schedule if schedule is None else schedule
        x = sampler.init_x(shape, generator=generator, device=device) if x_init is None else x_init

        # every per-step quantity up front (noise conditions, the scalers a and b), so the loop makes no host syncs
        # and spends its time in the model
        ts = torch.linspace(t_start, t_end, timesteps + 1)
        logSNRs = schedule(ts, shift=shift)[:, None].expand(-1, x.size(0)).to(x.device)  # T+1, B
        noise_conds = self.noise_cond(logSNRs)
        noise_conds_cfg = noise_conds.repeat(1, 2)  # cond then uncond
        # The scalers as plain numbers (every sample shares the step's t; one host sync here, none in the loop): the
        # targets' and samplers' formulas then do their scalar arithmetic in Python, not as tiny torch ops
        a_all, b_all = (v.tolist() for v in self.input_scaler(logSNRs[:, 0]))
        ts = ts.tolist()
        logSNRs, noise_conds, noise_conds_cfg = (v.unbind(0) for v in (logSNRs, noise_conds, noise_conds_cfg))
        pass_scalers = takes_scalers(sampler)

        cfg_inputs = None  # model_inputs paired with unconditional_inputs, built on the first CFG step
        for i in range(timesteps):
            in_window = (cfg_t_stop is None or ts[i] >= cfg_t_stop) and (cfg_t_start is None or ts[i] <= cfg_t_start)
            if cfg is not None and in_window:
                if cfg_inputs is None:
                    cfg_inputs = pair_inputs(model_inputs, unconditional_inputs)
                pred, pred_uncond = model(torch.cat([x, x]), noise_conds_cfg[i], **cfg_inputs).chunk(2)
                pred = guide(pred, pred_uncond, guidance_scale(cfg, ts[i]), cfg_rho)
            else:
                pred = model(x, noise_conds[i], **model_inputs)
            now, after = (a_all[i], b_all[i]), (a_all[i + 1], b_all[i + 1])
            x0, epsilon = self.undiffuse(x, logSNRs[i], pred, scalers=now)
            extra = {"scalers": (now, after)} if pass_scalers else {}
            x_prev = sampler(x, x0, epsilon, logSNRs[i], logSNRs[i + 1], generator=generator, **extra,
                             **sampler_params)
            x = x_prev if x_prev.dtype == x.dtype else x_prev.to(x.dtype)

            overrides = yield x0, x, pred
            if overrides:
                cfg = overrides.get("cfg", cfg)
                cfg_rho = overrides.get("cfg_rho", cfg_rho)
                if "sampler" in overrides:
                    sampler = overrides["sampler"]
                    pass_scalers = takes_scalers(sampler)
                if "model_inputs" in overrides:
                    model_inputs, cfg_inputs = overrides["model_inputs"], None
                x = overrides.get("x", overrides.get("x_init", x))
