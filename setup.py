"""The compiled part of the agent (everything else is in pyproject.toml).

agent.core._http1fast: the fast path of HTTP/1 request accounting (csrc/). `pip install`
(and so `make venv` and deploy/Dockerfile's builder stage) compiles it with the Python
headers and a C compiler both already need for python-iptables; the agent runs without it
(the pure-Python observer), but `make test` requires it (tests/unit/test_http1_fast.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "agent.core._http1fast",
            sources=["csrc/http1fast.c", "csrc/h1scan.c"],
            depends=["csrc/h1scan.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        )
    ],
)
