import os
import shutil


# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this when
# its functions are defined, so it must be set before anything imports triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


