"""A child process that imports napari-hemato once, then forks one real CLI process per request.

Saves the interpreter and onnxruntime start-up (about 2 s on the CI machine) for each of the
many processes the fault suite kills. Protocol, one JSON line each way on stdin/stdout:

    -> {"argv": [...], "stderr": "/path"}     <- {"pid": 1234}
                                               <- {"pid": 1234, "status": <waitpid status>}

The child is an ordinary process running ``napari_hemato.cli.main(argv)``: it writes its
files itself and dies of a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import sys

import onnxruntime  # noqa: F401

import napari_hemato.api  # noqa: F401  (the import cost paid once)
import napari_hemato.cli
import napari_hemato.cli.analyze  # noqa: F401
import napari_hemato.cli.export  # noqa: F401
import napari_hemato.core.export  # noqa: F401


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the CLI process
            fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            if request.get("cwd"):
                os.chdir(request["cwd"])
            code = 1
            try:
                if "argv" in request:
                    code = napari_hemato.cli.main(request["argv"])
                else:  # a Python snippet (autosave, export through the core functions)
                    exec(compile(request["code"], "<fault>", "exec"), {"__name__": "__fault__"})
                    code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:  # noqa: BLE001 - report it like an uncaught error would
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"pid": pid, "status": status}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
