"""Exponential moving average of a network's weights: the stage-1 generator and the stage-2 refiner are scored
with their EMA, the standard GAN and diffusion practice (the raw weights keep training)."""
import copy

import torch


class EMA:
    """Exponential moving average of a module's parameters (buffers copied), used for inference.

    The decay warms up as min(decay, (1 + n) / (10 + n)) so short runs are not dominated by the initial weights.
    """

    def __init__(self, model, decay=0.999):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params, params = dict(self.model.named_parameters()), dict(model.named_parameters())
        assert ema_params.keys() == params.keys(), "EMA.update got a module with different parameters"
        for name, p in params.items():
            ema_params[name].lerp_(p.detach(), 1 - decay)
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
