"""Serve `app.py` as if it were a ZeroGPU Space, on this machine: the `spaces` stand-in next to this file (a forked
worker per GPU call), SPACES_ZERO_GPU=true, and Gradio's "Sign in with Hugging Face" button mocked offline (gradio
mocks the sign-in routes off Spaces but asks the hub who the local token belongs to; here the user is
RAL_SMOKE_USER). For tests/test_space_smoke.py and for trying the Space's ZeroGPU path by hand:

    OAUTH_CLIENT_ID=local RAL_SMOKE_USER=me RAL_PORT=7861 .venv/bin/python tests/spaces_standin/serve_zerogpu.py
"""
import os
import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # `import spaces` finds the stand-in
sys.path.insert(1, str(ROOT))
os.environ.setdefault("SPACES_ZERO_GPU", "true")
os.environ.setdefault("OAUTH_CLIENT_ID", "local")  # the app shows its sign-in button when this is set

import gradio.oauth  # noqa: E402

USER = os.environ.get("RAL_SMOKE_USER", "local-user")


def _mocked_oauth_info() -> dict:
    return {"access_token": "local", "token_type": "bearer", "expires_in": 3600, "scope": "openid profile",
            "expires_at": int(time.time()) + 3600,
            "userinfo": {"sub": "0", "name": USER, "preferred_username": USER, "picture": ""}}


gradio.oauth._get_mocked_oauth_info = _mocked_oauth_info
os.chdir(ROOT)
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
