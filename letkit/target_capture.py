"""What the target's own forward pass computed, captured by forward hooks for an objective called after it.

:class:`~letkit.LETObjective` (the hidden states of some blocks) and :class:`~letkit.LogitDistillation` (the
model's logits) read tensors the target computed, without touching the user's model code. Both must use the
tensors of the forward that ran on the batch they are given, with its gradient, and not those of an evaluation
forward run in between: :class:`TargetCapture` does that for both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

OutputExtractor = Callable[[Any], Tensor]
"""Takes a watched module's forward output and returns the tensor to capture (or raises a TypeError naming the
module when the output holds none)."""


class TargetCapture:
    """Outputs of some of a target's modules, captured on every forward of the target by forward hooks.

    Captures are kept apart by grad mode: a forward under ``torch.no_grad()`` or ``torch.inference_mode()`` (an
    evaluation) does not replace the tensors of the latest forward with grad enabled, and :meth:`get` returns
    those captured in its caller's grad mode. Each capture is tagged with the token ids the target's own
    ``forward`` received (its first positional argument or its ``input_ids`` keyword), so :meth:`get` can refuse
    tensors of another batch. A forward with grad enabled drops what earlier no-grad forwards captured, so an
    evaluation batch's tensors are not held for the rest of training. Deep copies of the target (an EMA or
    evaluation copy carries the hooks along) capture nothing.

    Args:
        target: the model whose forward passes are watched.
        watched: what to capture, by key: an int key is a target layer (block) index, ``None`` the output of
            ``target`` itself. Each value is the module and an :data:`OutputExtractor` for its output.
        what: what the captured tensors are, for error messages (``"features"``, ``"logits"``).
    """

    def __init__(
        self, target: nn.Module, watched: Mapping[int | None, tuple[nn.Module, OutputExtractor]], *, what: str
    ) -> None:
        if not watched:
            raise ValueError("watched must name at least one module to capture")
        self.keys = list(watched)
        self.what = what
        self._captured: dict[bool, dict[int | None, tuple[Tensor, Tensor | None]]] = {True: {}, False: {}}
        self._forward_ids: Tensor | None = None
        # the batch is forgotten after the capture hooks ran: the target's own capture (key None) still sees it
        self._hooks = [
            target.register_forward_pre_hook(self._record_batch_hook(target), with_kwargs=True),
            *(module.register_forward_hook(self._capture_hook(key, module, extract))
              for key, (module, extract) in watched.items()),
            target.register_forward_hook(self._forget_batch_hook(target), always_call=True),
        ]

    def _record_batch_hook(self, root: nn.Module):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if module is not root:
                return
            if torch.is_grad_enabled():
                self._captured[False].clear()
            ids = kwargs.get("input_ids", args[0] if args else None)
            # token ids only (not embeddings): what the objective's input_ids are compared with
            self._forward_ids = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None

        return record

    def _forget_batch_hook(self, root: nn.Module):
        def forget(module: nn.Module, args: Any, output: Any) -> None:
            if module is root:
                self._forward_ids = None

        return forget

    def _capture_hook(self, key: int | None, watched: nn.Module, extract: OutputExtractor):
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            if module is watched:
                self._captured[torch.is_grad_enabled()][key] = (extract(output), self._forward_ids)

        return capture

    def _label(self, key: int | None) -> str:
        return self.what if key is None else f"layer-{key} {self.what}"

    def get(self, input_ids: Tensor) -> dict[int | None, Tensor]:
        """The tensors the target's latest forward in the current grad mode captured, by key. They stay captured
        (so a caller that then refuses its other arguments leaves them for a corrected call): call :meth:`discard`
        once they are used.

        Raises:
            RuntimeError: a watched module did not run in this grad mode since the last call, or, with grad
                enabled, a captured tensor carries no gradient (the objective would not train the target).
            ValueError: the captured tensors are not those of ``input_ids``: their leading ``[B, T]`` differs, or
                the target's forward ran on other token ids. Free when the target ran on the same tensor (or a
                view of the same memory); a different tensor is compared by value (a host-device sync on GPUs).
                Tensors from a forward that did not go through the target's own ``forward`` (no ids recorded)
                are checked on their shape only.
        """
        grad_mode = torch.is_grad_enabled()
        captured = self._captured[grad_mode]
        missing = [key for key in self.keys if key not in captured]
        if missing:
            mode = "with grad enabled" if grad_mode else "under no_grad/inference_mode"
            layers = [key for key in missing if key is not None]
            raise RuntimeError(
                f"no target {self.what} captured {mode}" + (f" for target layers {layers}" if layers else "") + ": run "
                "the target model's forward pass on this batch, in the same grad mode, before calling the objective"
                + (" (under reentrant activation checkpointing a block runs without grad: use use_reentrant=False)"
                   if layers else "")
            )
        tensors = {key: captured[key][0] for key in self.keys}
        forward_ids = captured[self.keys[0]][1]
        self._check_belongs_to(input_ids, self.keys[0], tensors[self.keys[0]], forward_ids)
        if grad_mode:
            without_grad = [key for key in self.keys if not tensors[key].requires_grad]
            if without_grad:
                raise RuntimeError(
                    f"the target's {self._label(without_grad[0])} carry no gradient although grad mode is on: the "
                    "modules computing them are frozen or their output was detached, so the objective would not train "
                    "the target. Call the objective under torch.no_grad() to only measure its loss"
                )
        return tensors

    def discard(self) -> None:
        """Forget what was captured in the current grad mode (a step that does not use it)."""
        self._captured[torch.is_grad_enabled()].clear()

    def close(self) -> None:
        """Remove the hooks and forget every capture."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for captured in self._captured.values():
            captured.clear()
        self._forward_ids = None

    def _check_belongs_to(self, input_ids: Tensor, key: int | None, tensor: Tensor, forward_ids: Tensor | None) -> None:
        if tensor.shape[:2] != input_ids.shape[:2]:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} is not the batch the target just ran on "
                f"(its {self._label(key)} are {tuple(tensor.shape)})"
            )
        if forward_ids is None or forward_ids is input_ids:
            return
        same_memory = (forward_ids.device == input_ids.device and forward_ids.data_ptr() == input_ids.data_ptr()
                       and forward_ids.shape == input_ids.shape and forward_ids.stride() == input_ids.stride())
        if not same_memory and not (forward_ids.shape == input_ids.shape
                                    and torch.equal(forward_ids, input_ids.to(forward_ids))):
            raise ValueError(
                f"the target's latest forward in this grad mode ran on other token ids than the input_ids given to the "
                f"objective: its {self._label(key)} belong to another batch. Call the objective right after the "
                "target's forward on the same batch"
            )
