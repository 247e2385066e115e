"""Does loading a GGUF through llama.cpp depend on what the process imported before it? Each case in a fresh process.

A CUDA build of llama-cpp-python crashed (SIGSEGV) loading a 12B-shaped GGUF when numpy had been imported before
llama_cpp, and loaded it when llama_cpp came first. Each case here loads the model after a different set of imports
(numpy first, llama_cpp first, numpy with the C++ runtime made global first, torch with CUDA initialised first),
either as llama-cpp-python's `Llama` does (all layers on the GPU) or through ft's loader (`quantize.llama_lib`, as
eval does) decoding a few tokens. A case that crashes is run again for its native stack: under gdb where the machine
has it, else with a signal handler preloaded (`backtrace_symbols_fd`, compiled here with cc; no maintained tool
prints a native stack without a debugger). Every case lists the shared libraries mapped before the load.

    python -m bench.load_order --model /tmp/s12/model-Q4_K_M.gguf

Writes bench/results/load_order.json (or --out) and prints one line per case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.environment import environment

LOAD = """
import faulthandler, sys, time
faulthandler.enable()
{imports}
libraries = sorted({{line.split()[-1] for line in open('/proc/self/maps') if '.so' in line}})
print('LIBS', ' '.join(libraries), flush=True)
from eval.runner import LlamaModel
from eval.mtp import decode_all
started = time.perf_counter()
{load}
print('LOADED', round(time.perf_counter() - started, 2), flush=True)
"""
FT_LOAD = ("from eval.mtp import decode_all; "
           "print('TOKENS', decode_all(Path(sys.argv[1]), [[2, 10, 20, 30]], 8)[0].tokens, flush=True)")
RAW_LOAD = ("import llama_cpp; model = llama_cpp.Llama(sys.argv[1], n_gpu_layers=-1, verbose=False); "
            "print('TOKENS', model.tokenize(b'hello'), flush=True)")
GLOBAL_LIBSTDCXX = ("import ctypes, ctypes.util; "
                    "ctypes.CDLL(ctypes.util.find_library('stdc++'), mode=ctypes.RTLD_GLOBAL)")
# SIGSEGV/SIGBUS/SIGILL/SIGABRT: the faulting address, the mapping that holds it, and the native stack.
HANDLER = r"""
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static void on_signal(int sig, siginfo_t *info, void *context) {
    char line[512];
    int n = snprintf(line, sizeof line, "NATIVE signal %d at address %p\n", sig, info->si_addr);
    write(2, line, n);
    void *frames[64];
    backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
    FILE *maps = fopen("/proc/self/maps", "r");
    unsigned long lo, hi, at = (unsigned long) info->si_addr;
    while (maps && fgets(line, sizeof line, maps))
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= at + 65536 && at < hi + 65536) write(2, line, strlen(line));
    signal(sig, SIG_DFL);
    raise(sig);
}
__attribute__((constructor)) static void install(void) {
    stack_t stack = {.ss_sp = malloc(1 << 16), .ss_size = 1 << 16};
    sigaltstack(&stack, 0);
    struct sigaction action = {.sa_sigaction = on_signal, .sa_flags = SA_SIGINFO | SA_ONSTACK};
    int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGABRT};
    for (int i = 0; i < 4; i++) sigaction(signals[i], &action, 0);
}
"""
CASES = {  # name: (imports before the load, the load, environment)
    "numpy, then llama_cpp": ("import numpy", RAW_LOAD, {}),
    "llama_cpp, then numpy": ("import llama_cpp, numpy", RAW_LOAD, {}),
    "numpy, libstdc++ made global, then llama_cpp": (f"import numpy; {GLOBAL_LIBSTDCXX}", RAW_LOAD, {}),
    "numpy, then ft's loader (eval)": ("import numpy", FT_LOAD, {}),
    "torch with CUDA, then ft's loader (eval)": ("import torch; torch.zeros(1, device='cuda')", FT_LOAD, {}),
}


def native_stack_command(command: list[str], work: Path) -> tuple[list[str], dict[str, str]]:
    """The command run for its native stack on a crash: under gdb, else with HANDLER preloaded."""
    if shutil.which("gdb"):
        return ["gdb", "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary", "--args", *command], {}
    source, library = work / "on_signal.c", work / "on_signal.so"
    source.write_text(HANDLER)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(library), str(source)], check=True)
    return command, {"LD_PRELOAD": str(library)}


def run_case(name: str, model: Path, timeout: int, native_stack: Path | None = None) -> dict:
    """One case in a fresh process; with `native_stack` (a scratch folder), run for the native stack."""
    imports, load, env = CASES[name]
    code = "from pathlib import Path\n" + LOAD.format(imports=imports, load=load)
    command = [sys.executable, "-c", code, str(model)]
    if native_stack is not None:
        command, extra = native_stack_command(command, native_stack)
        env = {**env, **extra}
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout,
                                env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"case": name, "returncode": None, "error": f"timed out after {timeout} s"}
    out = result.stdout + result.stderr
    lines = out.splitlines()
    libs = next((line.split()[1:] for line in lines if line.startswith("LIBS ")), [])
    return {
        "case": name, "returncode": result.returncode, "native_stack": native_stack is not None,
        "loaded_seconds": next((float(line.split()[1]) for line in lines if line.startswith("LOADED ")), None),
        "tokens": next((line[len("TOKENS ") :] for line in lines if line.startswith("TOKENS ")), None),
        "libraries_before_load": [Path(lib).name for lib in libs],
        "tail": [line for line in lines if not line.startswith("LIBS ")][-60:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load_order.json")
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--no-native-stack", dest="native_stack", action="store_false",
                        help="do not run a crashing case again for its native stack")
    args = parser.parse_args()
    cases = []
    for name in args.cases:
        case = run_case(name, args.model, args.timeout)
        cases.append(case)
        print(f"{name:34s} exit {case['returncode']}  loaded in {case.get('loaded_seconds')} s  "
              f"tokens {case.get('tokens')}", flush=True)
        if case["returncode"] not in (0, None) and args.native_stack:
            cases.append(run_case(name, args.model, args.timeout, native_stack=args.model.parent))
            print("\n".join(cases[-1]["tail"]), flush=True)
    from ft.atomic import write_text

    result = {"benchmark": "load_order", "date": datetime.date.today().isoformat(), "model": args.model.name,
              "gdb": shutil.which("gdb") is not None, "cases": cases, "environment": environment(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
