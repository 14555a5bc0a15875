"""Gaussian noise that is reproducible per sample.

Every random draw of GDF (the noise of `diffuse`, the initial latent and each stochastic sampler step) goes
through `randn`, so one seed fixes one image: with a list of generators, sample i only ever reads generator i,
and image i of a batch is the image that generator i gives alone (as in diffusers' `randn_tensor`).
"""
import torch


def rand_per_sample(generators):
    """One U[0, 1) draw per sample, each from that sample's own generator: a sample's random choices (noise level,
    dropouts) then do not depend on the batch it lands in."""
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def randn(shape, generator=None, device=None, dtype=torch.float32):
    """N(0, I) of `shape` on `device`; `generator` is None (global RNG), a `torch.Generator` or one per sample.

    With a generator and no `device`, the noise stays where the generator lives.
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return _draw(shape, generator, device, dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
    draws = [_draw((1, *shape[1:]), g, device, dtype) for g in generator]
    return draws[0] if len(draws) == 1 else torch.cat(draws)


def _draw(shape, generator, device, dtype):
    # a generator can only fill tensors on its own device, so draw there and move the result
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return noise if device is None or noise.device == torch.device(device) else noise.to(device)
