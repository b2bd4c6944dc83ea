import sys
from pathlib import Path

# tests/equivariance.py and friends are helpers, importable as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
