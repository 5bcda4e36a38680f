"""Probe (GPU machine): which CUDA VMM sharing calls work in a process restored by CRIU + the CUDA checkpoint API.

Run under warmstart (SDK worker): it maps weights from a weight service, releases them on quiesce, and on
resume tries (1) importing the service's exported memory again and (2) creating and exporting memory of its
own; it prints what each returned. bench/probes/import_after_restore.sh drives it.
"""

import glob
import sys
import time

from warmstart.worker import attach
from warmstart.gpumem import vmm
from warmstart.weights.client import SharedWeights


def main() -> None:
    sock, model_dir = sys.argv[1], sys.argv[2]
    w = SharedWeights(sock, sorted(glob.glob(f"{model_dir}/*.safetensors")), "cuda:0")

    def on_resume(settings) -> None:
        d = vmm.driver()
        try:
            w.restore()
            print("probe: import after restore: ok", flush=True)
        except Exception as e:
            print(f"probe: import after restore: {e}", flush=True)
        try:
            vmm.ok(d.cuCtxSetCurrent(w._ctx), "ctx")
            prop, gran = vmm.device_memory(0, exportable=True)
            h = vmm.ok(d.cuMemCreate(gran, prop, 0), "cuMemCreate")
            fd = vmm.ok(d.cuMemExportToShareableHandle(
                h, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), "export")
            print(f"probe: export own memory after restore: ok (fd {fd})", flush=True)
        except Exception as e:
            print(f"probe: export own memory after restore: {e}", flush=True)

    attach(w.release, on_resume, engine="probe")
    print("probe: ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
