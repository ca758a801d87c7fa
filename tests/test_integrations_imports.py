"""``import letkit`` (and the framework-free integration modules) must not import any trainer framework."""

import subprocess
import sys


def test_letkit_imports_no_trainer_framework():
    code = ("import sys, letkit, letkit.integrations.ddp, letkit.integrations.lightning\n"
            "heavy = ('transformers', 'accelerate', 'lightning', 'pytorch_lightning', 'torchtitan')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_letkit_modules_import_no_deprecated_alias():
    # letkit.tokenization and letkit.data's moved names are kept for users; letkit itself must not warn on import
    code = ("import warnings\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "import letkit, letkit.cli, letkit.export, letkit.evaluation\n"
            "import letkit.integrations.checks, letkit.integrations.ddp, letkit.integrations.lightning\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_import_letkit_leaves_torch_distributed_tensor_unloaded():
    # torch.distributed.tensor costs about half of torch's own import time; only a multi-rank run needs it
    code = "import sys, letkit\nprint('torch.distributed.tensor' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
