"""Put this folder on PYTHONPATH to run a Python (the test ComfyUI server) with the CPU-torchvision hook.

Test-only, never shipped: see torchvision_schemas.py for why it exists and what it hides.
"""

import torchvision_schemas

torchvision_schemas.install()
