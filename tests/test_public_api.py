import subprocess
import sys

import detr_panoptic


def test_every_public_name_resolves() -> None:
    for name in detr_panoptic.__all__:
        assert getattr(detr_panoptic, name) is not None, name


def test_import_and_help_do_not_import_torch() -> None:
    code = (
        "import sys, detr_panoptic\n"
        "from detr_panoptic.cli import build_parser\n"
        "build_parser()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "the package import or --help pulls in torch"
