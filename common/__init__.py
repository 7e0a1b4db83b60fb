"""The floor every other folder builds on (see docs/architecture.md)."""

import logging

# bitsandbytes, imported by peft whenever it is installed, warns on every CPU with AVX512-BF16 that an
# optional kernels package is missing, although that kernel only matters for 4-bit inference: the
# warning would open every study's console. A quantized study still sees bitsandbytes' errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
