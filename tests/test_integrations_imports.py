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
