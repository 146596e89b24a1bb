"""EB-JDAT (Jiang et al., "Your Classifier Can Do More", CVPR 2026), its SADA-JEM variant, as
their code runs it (jkcjkc/EB-JDAT, `EB-JDAT-SADAJEM/train_sadajem.py`, `train.sh`;
../shared/ALGORITHMS.md, "Successors"). Their images are in [-1, 1], ours in [0, 1]: a
length there is half a length here, and a gradient there is half a gradient here.

Per step (`train.train_step`, no loop of its own):
- two minibatches: x+ of 64 unaugmented images plus N(0, 0.015^2) (their sigma 0.03),
  not clipped (`data.energy_batch_size`, `data.energy_noise_std`), and (x, y) of 128
  augmented images;
- x_q: SGLD on E(x) = -logsumexp f(x) from a 10k replay buffer, 10 steps of
  x <- clip(x - 0.25 clamp(grad_x E, -2, 2), 0, 1), no noise (theirs: x + 1.0 clamp(grad
  logsumexp, -1, 1) on [-1, 1] images), BatchNorm normalising with the chain's batch (their
  train mode; unlike PyTorch our chain's passes leave the running statistics alone);
  re-initialised entries (prob. 0.05) and the whole initial buffer come from the class-
  conditional Gaussians (full covariance + 1e-4 I in their [-1, 1] units, 2.5e-5 I in ours;
  the initial buffer class-balanced, buffer_size / 10 draws of each class, as their
  init_from_centers; re-initialisation a random class per entry, as their init_random).
  ALGORITHMS.md says "no clip": their code clamps x_q to the image range each step, and so
  do we (`sampler.clip`). The 10 x 3072^2 Gaussians stay out of the TrainState: the state
  carries `sampler.reinit_pool_size` images pre-drawn from them (`extra['reinit_pool']`,
  sharded like the buffer), and re-initialisation draws from that pool;
- x_q: as many chains as x+ has images (their sample_q draws args.batch_size = 64);
- x~ (`perturbation.name = logit_direction`, BatchNorm running statistics): from
  x + U(-eps, eps), 5 sign steps on sum_i f(x~_i)[y_i] + ||f(x_i)/(|f(x_i)| + 1e-10) -
  f(x~_i)/(|f(x~_i)| + 1e-10)||^2 (their `perceptionloss`: per-example normalisation, summed
  over the micro-batch of 2 they attack in; `perturbation.direction_weight` = 1), eps 8/255
  and step 2/255 in THEIR units, i.e. 4/255 and 1/255 here (`perturbation.eps`,
  `perturbation.step_size`).
  Code vs text: the code has no eps-ball projection, only the image box
  (`perturbation.project_eps = False`; True projects), and its class term RAISES f(x~)[y],
  lowering E(x~, y), where the text says energy ascent (`perturbation.class_logit_sign`:
  +1 the code, -1 the text);
- loss [mean E(x+) - mean E(x_q)] + CE(f(x), y) + 0.1 [mean E(x+) - mean E(x~)] + CE(f(x~), y)
  (`loss.ebjdat_weights`; the paper says 1/1/1);
- SAM, adaptive, rho 2 (`optimizer.sam_rho`, `optimizer.sam_adaptive`): the second pass
  recomputes the loss at the perturbed weights on the same batches, x_q and x~, and its
  BatchNorm statistics are discarded (theirs: `disable_running_stats`; their first pass also
  adds l2_coeff (fp^2 + fq^2), with l2_coeff 0); base SGD 0.01, momentum 0.9, wd 5e-4, 1000 linear
  warm-up iterations, 200 epochs (the paper: 100), x0.2 at epochs 50, 100, 150.
- WRN-28-10 with BatchNorm of torch momentum 0.9 (their models/norms.py, get_norm:
  `nn.BatchNorm2d(n, momentum=0.9)`, read from the stored .pyc's constants), flax's 0.1
  (`model.bn_momentum`): the running statistics follow the last batches almost entirely;
  crop of a reflect-padded image (their utils.get_data; `data.pad_mode = reflect`);
  leaky ReLU 0.2, [-1, 1] inputs: JEM's wideresnet, which
  SADA-JEM's `--model wrn --norm batch` builds (their models/wideresnet.py is not in the
  stored snapshot, only its .pyc: the activation is JEM's, not re-read).
Generation (sample.*): as their `--plot_uncond` samples and their FID (on the replay
buffer): their x_q chain on E(x) from the trained buffer, 10 steps of 0.25 with the gradient
clamped at 2, no noise. Their FID filters the buffer by confidence; ours does not.
`:cpu`: the model, augmentation and size of our other `:cpu` robust recipes (WRN-10-1,
BatchNorm, ReLU, mean/std inputs; 2 epochs, one-cycle SGD), SGLD of 5 steps from a 500-image
buffer (as energy_common.use_cpu_scale), 3 attack steps (as trades:cpu). Untuned.
"""
from configs import default


def get_config(arg=None):
  c = default.get_base_config()
  c.recipe = 'ebjdat'
  c.batch_size = 128
  c.data.energy_batch_size = 64
  c.data.energy_noise_std = 0.015
  c.model.norm = 'batch'
  c.model.bn_momentum = 0.1
  c.data.pad_mode = 'reflect'
  c.model.activation = 'leaky_relu'
  c.model.input_normalization = 'minus_one_one'

  c.perturbation.name = 'logit_direction'
  c.perturbation.bn_mode = 'running'
  c.perturbation.eps = 4 / 255
  c.perturbation.step_size = 1 / 255
  c.perturbation.num_steps = 5
  c.perturbation.project_eps = False
  c.perturbation.class_logit_sign = 1.0
  c.perturbation.direction_weight = 1.0

  c.sampler.name = 'sgld_buffer'
  c.sampler.bn_mode = 'batch'
  c.sampler.num_steps = 10
  c.sampler.step_size = 0.25
  c.sampler.noise_std = 0.0
  c.sampler.grad_clamp = 2.0
  c.sampler.clip = True
  c.sampler.buffer_size = 10000
  c.sampler.reinit_prob = 0.05
  c.sampler.reinit = 'class_gaussian'
  c.sampler.reinit_pool_size = 10000

  c.loss.name = 'ebjdat'
  c.loss.ebjdat_weights = (1.0, 1.0, 0.1, 1.0)

  c.optimizer.name = 'sgd'
  c.optimizer.lr = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.sam_rho = 2.0
  c.optimizer.sam_adaptive = True
  c.schedule.name = 'multistep'
  c.schedule.decay_epochs = (50, 100, 150)
  c.schedule.decay_factor = 0.2
  c.schedule.warmup_steps = 1000
  c.num_epochs = 200

  c.sample.objective = 'unconditional'
  c.sample.start = 'buffer'
  for key in ('num_steps', 'step_size', 'noise_std', 'grad_clamp'):  # their training chain
    c.sample[key] = c.sampler[key]
  default.apply_scale(c, arg)
  if arg in ('cpu', 'smoke'):  # the model family of at/trades at these scales
    c.model.activation = 'relu'
    c.model.input_normalization = 'meanstd'
  if arg == 'cpu':
    c.perturbation.num_steps = 3
    c.sampler.num_steps = 5
    c.sampler.buffer_size = 500
    c.sampler.reinit_pool_size = 500
    c.num_epochs = 2
    c.schedule.name = 'onecycle'
    c.schedule.warmup_steps = 0
    c.optimizer.lr = 0.1
  if arg == 'smoke':
    c.data.energy_batch_size = 8
    c.sampler.reinit_pool_size = 64
  return c
