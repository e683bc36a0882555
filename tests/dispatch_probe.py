"""A jitted 8-device step with one all-gather, dispatched N times, at most LIMIT in flight (0 = unbounded,
as a loop that never reads its results): `python tests/dispatch_probe.py N LIMIT`. Unbounded, XLA:CPU
aborts in its all-gather rendezvous after ~45 s once more than 32 steps are queued (me5_jax.dispatch); run
by tests/test_dispatch.py with the project's bound, where it finishes in seconds."""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

from me5_jax import dispatch  # noqa: E402


def main(steps: int, limit: int) -> None:
  mesh = Mesh(np.array(jax.devices()), ("d",))

  @jax.jit
  def step(w_DxD, x_BxD):
    gathered_BxD = jax.lax.with_sharding_constraint(x_BxD @ w_DxD, NamedSharding(mesh, P()))  # all-gather
    grad_DxD = jax.grad(lambda w: jnp.mean(jnp.tanh(x_BxD @ w) ** 2))(w_DxD)
    return w_DxD - 1e-3 * grad_DxD, jnp.mean(jnp.tanh(gathered_BxD @ w_DxD.T) ** 2)

  w_DxD = jnp.full((256, 256), 0.01)
  x_BxD = jax.device_put(np.random.default_rng(0).random((8 * 64, 256), np.float32), NamedSharding(mesh, P("d")))
  in_flight = dispatch.InFlight(limit) if limit else None
  start = time.perf_counter()
  for _ in range(steps):
    if in_flight is not None:
      in_flight.admit()
    w_DxD, loss = step(w_DxD, x_BxD)
    if in_flight is not None:
      in_flight.add(loss)
  jax.block_until_ready(w_DxD)
  print(f"{steps} steps, at most {limit or 'unbounded'} in flight: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
