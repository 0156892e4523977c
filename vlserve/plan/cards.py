"""Common GPUs: memory (MiB as nvidia-smi lists it; torch sees a little less: 81,079 of 81,559 MiB on the H100 we
measured) and compute capability. `--cluster SPEC` plans for cards named here; a live machine reports its own."""

import re
from dataclasses import dataclass

from vlserve.errors import ConfigError

MIB = 2**20
OLDEST_SUPPORTED = (7, 5)  # Turing: vlserve's kernels and PyTorch's CUDA 13 builds start here (design note)


@dataclass(frozen=True)
class Card:
    name: str
    memory_bytes: int
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def flash_attention(self) -> bool:
        """Flash attention (and bf16) need Ampere or newer; older cards use SDPA's other kernels."""
        return self.capability >= (8, 0)

    def describe(self) -> str:
        return f"{self.name} ({self.memory_bytes / 2**30:.1f} GiB, compute capability {self.capability[0]}." \
               f"{self.capability[1]})"


def _card(name: str, mib: int, capability: tuple[int, int]) -> Card:
    return Card(name, mib * MIB, capability)


CARDS = [
    _card("V100-16GB", 16160, (7, 0)), _card("V100-32GB", 32510, (7, 0)),
    _card("T4", 15360, (7, 5)), _card("RTX2080Ti", 11019, (7, 5)), _card("TitanRTX", 24220, (7, 5)),
    _card("QuadroRTX8000", 49152, (7, 5)),
    _card("A100-40GB", 40960, (8, 0)), _card("A100-80GB", 81920, (8, 0)), _card("A30", 24576, (8, 0)),
    _card("A10", 23028, (8, 6)), _card("A10G", 23028, (8, 6)), _card("A40", 46068, (8, 6)),
    _card("RTX3090", 24576, (8, 6)), _card("RTXA5000", 24564, (8, 6)), _card("RTXA6000", 49140, (8, 6)),
    _card("L4", 23034, (8, 9)), _card("L40S", 46068, (8, 9)), _card("RTX4090", 24564, (8, 9)),
    _card("RTX6000Ada", 49140, (8, 9)),
    _card("H100", 81559, (9, 0)), _card("H100-80GB", 81559, (9, 0)), _card("H100-94GB", 95830, (9, 0)),
    _card("H200", 143771, (9, 0)), _card("GH200", 97871, (9, 0)),
    _card("B200", 183359, (10, 0)), _card("RTX5090", 32607, (12, 0)),
]
_BY_KEY = {re.sub(r"[^a-z0-9]", "", c.name.lower()): c for c in CARDS}


def find_card(name: str) -> Card:
    """A card of the table by name; case, spaces, dashes and an 'NVIDIA'/'GeForce' prefix do not matter."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = re.sub(r"^(nvidia)?(geforce|tesla)?", "", key)
    if key in _BY_KEY:
        return _BY_KEY[key]
    known = ", ".join(c.name for c in CARDS)
    raise ConfigError(f"unknown card {name!r} in --cluster; known cards: {known}")
