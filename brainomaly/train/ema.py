"""Exponential moving average of a network's weights: the stage-1 generator and the stage-2 refiner are scored
with their EMA, the standard GAN and diffusion practice (the raw weights keep training)."""
import copy

import torch


class EMA:
    """Exponential moving average of a module's parameters (buffers copied), used for inference.

    With warmup (the default) the decay of the n-th update is min(decay, (1 + n) / (10 + n)), so that short runs are
    not dominated by the initial weights; without it every update uses the full decay (the warm-up reaches 0.99 after
    about 900 updates and 0.999 only after about 9,000, so a long horizon takes effect in a short run only without
    it). copy_from sets the average to a module's weights without counting an update (the warm-up then starts
    from the next update).
    """

    def __init__(self, model, decay=0.999, warmup=True):
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self):
        """The decay the next update uses."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model):
        decay = self.current_decay()
        self.num_updates += 1
        ema_params, params = dict(self.model.named_parameters()), dict(model.named_parameters())
        assert ema_params.keys() == params.keys(), "EMA.update got a module with different parameters"
        for name, p in params.items():
            ema_params[name].lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    @torch.no_grad()
    def copy_from(self, model):
        """The average set to model's weights and buffers (no update counted)."""
        ema_params, params = dict(self.model.named_parameters()), dict(model.named_parameters())
        assert ema_params.keys() == params.keys(), "EMA.copy_from got a module with different parameters"
        for name, p in params.items():
            ema_params[name].copy_(p.detach())
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])

    def copy_to(self, model):
        model.load_state_dict(self.model.state_dict())
