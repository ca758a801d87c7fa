"""Run by tests/test_integrations_hf.py under torchrun (2 CPU ranks, gloo): one LETTrainer step with a learned
projector, without and then with gradient clipping. Each rank writes the gradients it stepped with and the logged
grad_norm to OUT_DIR/{unclipped,clipped}_rank{r}.safetensors / .json."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from integrations_testing import named_trainables
from letkit import LETObjective, LinearDecay
from letkit.integrations.hf import LETTrainer

MAX_NORM = 1e-3  # far below the gradients' norm: clipping is active


def tiny_llama(hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))


class GradRecorder(TrainerCallback):
    def __init__(self, target, objective) -> None:
        self.named, self.grads = named_trainables(target, objective), {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in self.named.items() if p.grad is not None}


def run(out_dir: Path, name: str, max_grad_norm: float) -> None:
    target, teacher = tiny_llama(32, seed=0), tiny_llama(16, seed=1)
    torch.manual_seed(2)
    objective = LETObjective(target, teacher, projector="linear", schedule=LinearDecay(1.0, stop_step=1))
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(3))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(out_dir / name), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=0.05, optim="sgd", max_grad_norm=max_grad_norm, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    recorder = GradRecorder(target, objective)
    trainer = LETTrainer(model=target, args=args, train_dataset=dataset, let_objective=objective, callbacks=[recorder])
    trainer.train()
    rank = torch.distributed.get_rank()
    save_file(recorder.grads, out_dir / f"{name}_rank{rank}.safetensors")
    grad_norm = next(entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry)
    (out_dir / f"{name}_rank{rank}.json").write_text(json.dumps({"grad_norm": grad_norm,
                                                                "distributed_type": trainer.accelerator.distributed_type}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), "unclipped", 0.0)
    run(Path(sys.argv[1]), "clipped", MAX_NORM)
