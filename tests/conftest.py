import os, sys, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def bin_path(name):
    "A console script from the same environment as the running python."
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else shutil.which(name)

@pytest.fixture
def cli():
    return bin_path
