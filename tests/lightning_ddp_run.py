"""Run by tests/test_integrations_lightning.py under torchrun (2 CPU ranks, gloo): LETMixin with Lightning's DDP,
a learned projector, S_stop inside the run. Each rank writes its module's weights to OUT_DIR/rank{r}.safetensors."""

import sys

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from letkit import LETObjective, LinearDecay
from letkit.integrations.lightning import LETMixin
from letkit.models import from_preset


class Module(LETMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = from_preset("tiny", hidden_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        teacher = from_preset("tiny", hidden_size=16, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        torch.manual_seed(1 + torch.distributed.get_rank())  # different projectors: DDP must broadcast rank 0's
        self.let = LETObjective(self.model, teacher, projector="linear", schedule=LinearDecay(1.0, stop_step=2))

    def training_step(self, ids, batch_idx):
        logits = self.model(ids)
        return self.let_loss(ids, F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")  # Lightning reuses it
    module = Module()
    ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(3))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(ids, batch_size=2))
    assert module.let.finished
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, f"{out_dir}/rank{trainer.global_rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
