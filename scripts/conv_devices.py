"""Why the CPU step is data parallel over one device per core (issue 15): one 3x3
convolution's forward pass and weight gradient at the cpu-quick sizes, on one JAX device
against the batch split over every device, in one process. Prints milliseconds (medians).

    LDM_JAX_CPU_DEVICES=2 python scripts/conv_devices.py             # 1 device vs 2, 2 cores
    LDM_JAX_CPU_DEVICES=1 taskset -c 0 python scripts/conv_devices.py  # one device on one core
"""
import time

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax import cli


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def weight_grad(x, w, g):
    return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def median_ms(f, *args, n=20):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    cli.setup_jax()
    mesh = cli.data_mesh()
    split, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    print(f"{mesh.size} devices; batch, size, channels in -> out: ms on 1 device / split")
    for b, h, c, o in [(64, 28, 32, 32), (64, 14, 64, 64), (64, 7, 32, 64), (64, 28, 1, 32)]:
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        x, g = jax.random.normal(k1, (b, h, h, c)), jax.random.normal(k2, (b, h, h, o))
        w = 0.1 * jax.random.normal(k3, (3, 3, c, o))
        xs, gs, ws = jax.device_put(x, split), jax.device_put(g, split), jax.device_put(w, rep)
        one = (median_ms(jax.jit(conv), x, w), median_ms(jax.jit(weight_grad), x, w, g))
        spread = (median_ms(jax.jit(conv, out_shardings=split), xs, ws),
                  median_ms(jax.jit(weight_grad, out_shardings=rep), xs, ws, gs))
        print(f"{b} x {h}x{h}, {c} -> {o}: forward {one[0]:.2f} / {spread[0]:.2f}, "
              f"weight gradient {one[1]:.2f} / {spread[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
