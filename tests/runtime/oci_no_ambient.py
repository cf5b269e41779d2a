#!/usr/bin/python3
"""OCI runtime wrapper: clear ambient capabilities, then exec runc with the same arguments.

Why: podman gives a non-root ``--user`` its ``--cap-add`` set as *ambient* capabilities, so a
non-root process has them whatever the image does. Kubernetes (containerd, CRI-O) never sets
ambient capabilities for a non-root container: the process gets them only from file
capabilities on the executable. Clearing ``ambient`` in the bundle's ``config.json`` (``create``)
and in the process file (``exec --process``) makes podman behave like the kubelet's runtime, so
an image without ``setcap`` fails here exactly as it would in a cluster.
Standard library only (it runs under the host's /usr/bin/python3, outside any venv).
"""

import json
import os
import sys

RUNC = os.environ.get("PALISADE_OCI_RUNTIME", "/usr/bin/runc")


def _clear(path: str, process_key: bool) -> None:
    with open(path) as fh:
        doc = json.load(fh)
    proc = doc.get("process", {}) if process_key else doc
    caps = proc.get("capabilities")
    if isinstance(caps, dict) and caps.get("ambient"):
        caps["ambient"] = []
        tmp = path + ".palisade"
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, path)


def main(argv: list[str]) -> None:
    if "create" in argv or "run" in argv:
        bundle = "."
        for flag in ("--bundle", "-b"):
            if flag in argv:
                bundle = argv[argv.index(flag) + 1]
        for arg in argv:
            if arg.startswith("--bundle="):
                bundle = arg.split("=", 1)[1]
        _clear(os.path.join(bundle, "config.json"), True)
    if "exec" in argv:
        for i, arg in enumerate(argv):
            if arg in ("--process", "-p") and i + 1 < len(argv):
                _clear(argv[i + 1], False)
            elif arg.startswith("--process="):
                _clear(arg.split("=", 1)[1], False)
    os.execv(RUNC, [RUNC, *argv[1:]])


if __name__ == "__main__":
    main(sys.argv)
