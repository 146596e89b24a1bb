"""Shared settings of the energy recipes (JEM, PreJEAT, JEAT): JEM's model and optimizer.

Paper Table 4 / JEM: WRN-28-10 without normalisation (BatchNorm breaks the pure
energy SGLD needs), leaky ReLU 0.2, images scaled to [-1, 1] inside the model,
Adam 1e-4 (0.9, 0.999), batch 64, x0.3 at epochs 160 and 180, 200 epochs, no
weight decay, JEM's 1000-iteration warmup, crop of a reflect-padded image
(train_wrn_ebm.py: tr.Pad(4, padding_mode="reflect")).
"""


def use_jem_setup(c):
  c.model.norm = 'none'
  c.data.pad_mode = 'reflect'
  c.model.activation = 'leaky_relu'
  c.model.input_normalization = 'minus_one_one'
  c.batch_size = 64
  c.optimizer.name = 'adam'
  c.optimizer.lr = 1e-4
  c.optimizer.weight_decay = 0.0
  c.schedule.name = 'multistep'
  c.schedule.decay_epochs = (160, 180)
  c.schedule.decay_factor = 0.3
  c.schedule.warmup_steps = 1000
  c.num_epochs = 200
  # A healthy JEM/JEAT loss is a few units at every scale: CE plus the difference of two
  # mean energies, which the p(x) term keeps close. A run-away chain drives it to the
  # hundreds or thousands (a JEM:cpu state at loss -2000 was once checkpointed under the
  # 1e4 bound and every rollback restarted from it); the bound is checked before every
  # checkpoint is written.
  c.divergence.max_abs_loss = 100.0
  return c


def use_cpu_scale(c, epochs: float):
  """WRN-10-1, Adam 1e-3 with a short warmup, `epochs` of the stand-in."""
  c.model.depth, c.model.width = 10, 1
  c.optimizer.lr = 1e-3
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 100
  c.num_epochs = 1
  c.num_train_steps = int(epochs * 50000 / c.batch_size)
  # A 500-image replay buffer, not 10000: each entry is revisited every ~8 steps, so the
  # persistent chains accumulate ~100 SGLD steps in the first 200 updates. With 10000
  # entries (revisited every ~156 steps) the short run's negatives stay near U(0, 1),
  # the model separates them at will and JEAT:cpu diverged at step ~100 in 4 of 4 tries
  # (also at lr 1e-4); with 500 it trains stably (measured 2026-11-26, 2 cores).
  c.sampler.buffer_size = 500
  return c
