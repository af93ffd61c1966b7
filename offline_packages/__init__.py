"""The bundle builder, one module per step: lock, wheels, python_standalone, models, and manifest
(the format of the manifest.json that autodl_deploy.sh reads); build.py is the command line that
runs them. Standard library only, so it runs on any machine with Python >= 3.10 and pip."""
