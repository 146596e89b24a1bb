"""Defaults shared by every recipe; each recipe file overrides a few keys.

Every config is `get_config(arg)`: no arg gives the paper's setting
(WRN-28-10, full CIFAR-10), ':cpu' a real but small run for 2 CPU cores and
':smoke' a seconds-long run for tests.
"""
import ml_collections

SCALES = (None, 'cpu', 'smoke')
STANDIN = '../shared/data/cifar10-jpeg-standin.npz'


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.recipe = 'natural'
  c.seed = 0
  c.dataset = 'cifar10'           # cifar10 | cifar100

  c.data = ml_collections.ConfigDict()
  c.data.source = 'auto'          # auto (TFDS if prepared, else the npz at data.path) | tfds | npz
  c.data.path = STANDIN           # npz with x_train, y_train, x_test, y_test
  c.data.tfds_data_dir = ''
  c.data.train_subset = 0         # > 0: train on this many random training images
  c.data.validation_size = 0      # > 0: hold out this many training images (a fixed draw, never
                                  # trained on) for robust_watch to choose checkpoints on
  c.data.augment = True           # pad 4 + random crop + horizontal flip
  c.data.pad_mode = 'reflect'     # the crop's padding: reflect (JEM, Rice et al., EB-JDAT) |
                                  # constant (zeros: torchvision RandomCrop(32, padding=4))
  c.data.energy_batch_size = 0    # > 0: a second, unaugmented batch of this size per step (its own
                                  # order stream) for the energy terms (EB-JDAT: 64); 0: off
  c.data.energy_noise_std = 0.0   # N(0, s^2) added to that batch, unclipped ([0, 1] units)

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'wrn'            # wrn (WRN-depth-width) | resnet18 (depth, width unused)
  c.model.depth = 28
  c.model.width = 10
  c.model.norm = 'batch'          # none | batch | group
  c.model.activation = 'relu'     # relu | leaky_relu (0.2) | swish
  c.model.dropout_rate = 0.0
  c.model.bn_momentum = 0.9       # flax's convention: running = m running + (1 - m) batch;
                                  # torch's momentum is 1 - m (its default 0.1 is our 0.9)
  c.model.input_normalization = 'meanstd'  # meanstd | minus_one_one | none
  c.model.dtype = 'bfloat16'      # compute dtype: float32 | bfloat16 (params, optimizer state,
                                  # energies and losses stay float32); float32 at :cpu / :smoke

  c.batch_size = 128              # global batch, over all devices
  c.num_epochs = 200
  c.num_train_steps = -1          # > 0 overrides num_epochs

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'        # sgd | adam
  c.optimizer.lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 5e-4
  c.optimizer.grad_clip_norm = 0.0
  c.optimizer.sam_rho = 0.0       # > 0: SAM around the optimizer (jeat_jax/sam.py), ball radius rho
  c.optimizer.sam_adaptive = True # SAM: adaptive (ASAM, |w|-scaled ball) or plain

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'multistep'   # constant | multistep | onecycle | cosine_onecycle | cosine
  c.schedule.decay_epochs = (100, 150)
  c.schedule.decay_factor = 0.1
  c.schedule.peak_fraction = 0.4  # onecycle, cosine_onecycle: where the lr peaks
  c.schedule.warmup_steps = 0
  c.schedule.cycle_momentum = False  # onecycle, cosine_onecycle: SGD momentum from max_momentum
  c.schedule.base_momentum = 0.85    # (ends) to base_momentum (lr peak) and back, replacing
  c.schedule.max_momentum = 0.95     # optimizer.momentum (torch's OneCycleLR defaults)

  # What the loss sees instead of x (recipes.perturb).
  c.perturbation = ml_collections.ConfigDict()
  c.perturbation.name = 'none'    # none | gaussian | pgd | energy | trades_kl | free
  c.perturbation.eps = 8 / 255
  c.perturbation.step_size = 2 / 255
  c.perturbation.num_steps = 10
  c.perturbation.random_start = True
  c.perturbation.grad_at_start = True  # energy attack: gradient at x + delta (FGSM-RS) or at x
  c.perturbation.sigma = 0.0      # gaussian noise std, [0, 1] pixel units
  c.perturbation.free_replays = 8
  c.perturbation.bn_mode = 'batch'  # BatchNorm inside attacks: batch (the reference's
                                    # model.train()) | running (its model.eval())
  c.perturbation.project_eps = True  # logit_direction: project onto the eps-ball (else [0, 1] only)
  c.perturbation.class_logit_sign = 1.0  # logit_direction: sign of its f(x~)[y] term
  c.perturbation.direction_weight = 1.0  # logit_direction: weight of its logit-direction term
  c.perturbation.unroll = 1       # > 1 unrolls attack loops (XLA:CPU runs conv gradients in
                                  # while loops on a slow path; the :cpu configs unroll fully)

  # Negative samples for the p(x) term (recipes.sample_negatives).
  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = 'none'         # none | sgld_buffer
  c.sampler.num_steps = 20
  c.sampler.parametrization = 'jem'  # jem: step_size/noise_std | paper: alpha/2, sqrt(alpha)
  c.sampler.step_size = 0.25      # JEM's 1.0 on [-1,1] images, in [0,1] units
  c.sampler.noise_std = 0.005     # JEM's 0.01 on [-1,1] images, in [0,1] units
  c.sampler.alpha = 1e-4
  c.sampler.clip = False
  c.sampler.buffer_size = 10000
  c.sampler.reinit_prob = 0.05
  c.sampler.init_range = (0.0, 1.0)
  c.sampler.reinit = 'uniform'    # fresh chain starts: uniform (U(init_range)) | class_gaussian
                                  # (N(mu_c, Sigma_c) of the train set; the buffer is initialised
                                  # from it too, class-balanced, as EB-JDAT's init_from_centers)
  c.sampler.reinit_pool_size = 10000  # class_gaussian: images pre-drawn at state creation
  c.sampler.grad_clamp = 0.0      # > 0: clamp grad_x E to [-c, c] in each step (EB-JDAT); 0: off
  c.sampler.bn_mode = 'batch'     # BatchNorm inside the chain: batch | running
  c.sampler.unroll = 1            # > 1 unrolls the SGLD loop (faster on XLA:CPU)

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'ce'              # ce | joint_energy | trades
  c.loss.trades_beta = 6.0
  c.loss.weat_variant = 'nat'     # trades loss: CE on x ('nat': TRADES, WEAT_nat) or on x_adv ('adv')
  c.loss.example_weights = 'uniform'  # uniform | inverse_softplus_energy (WEAT): per-example
                                      # weights of the classification terms (recipes.example_weights)
  c.loss.energy_weight = 1.0
  c.loss.ebjdat_weights = (1.0, 1.0, 0.1, 1.0)  # ebjdat: [E(x+) - E(x_q)], CE(x_lab),
                                                # [E(x+) - E(x~)], CE(x~)
  c.loss.energy_l2 = 0.0          # > 0: + l2 * mean(E(x+)^2 + E(x-)^2) (Du & Mordatch; not the paper's)

  c.divergence = ml_collections.ConfigDict()
  c.divergence.max_retries = 3    # rollbacks allowed per window of steps
  c.divergence.window_steps = 10000  # the budget restarts every this many steps (0: never)
  c.divergence.max_abs_loss = 1e4  # the energy recipes: 100 (energy_common)

  # Robust accuracy watched during training (catastrophic overfitting of single-step AT);
  # on by default for JEAT, PreJEAT and Fast AT. The best state is kept in WORKDIR/best/.
  c.robust_watch = ml_collections.ConfigDict()
  c.robust_watch.enabled = False
  c.robust_watch.num_examples = 512  # the first validation points (data.validation_size)
  c.robust_watch.num_steps = 10      # PGD-10 on CE, random start
  c.robust_watch.eps = 8 / 255
  c.robust_watch.step_size = 2 / 255
  c.robust_watch.collapse_fraction = 0.5  # warn when below this fraction of the best
  c.robust_watch.seed = 0

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 1
  c.distributed.process_id = 0

  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.async_checkpoints = True      # orbax writes while the next steps run (the last save waits)
  c.max_checkpoints_to_keep = 2
  c.dynamics_every_steps = 0      # > 0: log the energy changes of Eq. 15 every N steps
  add_eval_config(c)
  c.debug_inject_nan_at_steps = ()  # testing hook of the divergence guard: NaN parameters
                                    # before each of these steps, once per step
  add_sample_config(c)
  return c


def apply_scale(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """Shrinks a paper-scale config for 'cpu' or 'smoke' runs (the recipe may refine after)."""
  if arg not in SCALES:
    raise ValueError(f'unknown config string {arg!r}; use one of ":cpu", ":smoke" or none')
  if arg in ('cpu', 'smoke'):
    c.model.dtype = 'float32'  # bfloat16 is slow on CPUs without native support
  if arg == 'cpu':
    c.data.source = 'auto'
    c.perturbation.unroll = 10
    c.sampler.unroll = 20
    c.model.depth, c.model.width = 10, 1
    c.eval.num_examples = 1000
    c.fid.max_reference = 10000
    c.eval.unroll = 50              # every attack loop straight-line: PGD-20 5x faster than 10
    c.sample.unroll = 10            # with steps_per_call 10: no while loop at all
    c.sample.steps_per_call = 10
    c.log_every_steps = 20
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 100
    c.analysis.dynamics_period_steps = 100  # runs of 1-5 epochs: a point per 100 steps
  elif arg == 'smoke':
    c.data.train_subset = 256
    c.model.depth, c.model.width = 10, 1
    c.batch_size = 16
    c.num_epochs = 1
    c.num_train_steps = 4
    c.eval.num_examples = 64
    c.eval.batch_size = 32
    c.eval.attacks = 'fgsm,pgd20,energy1,energyk,cw_l2,cw_linf'
    c.eval.pgd_steps_scale = 0.1
    c.eval.audit_num_examples = 16
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 2
    c.sampler.buffer_size = 64
    c.sampler.num_steps = 2
    c.perturbation.num_steps = min(c.perturbation.num_steps, 2)
    c.perturbation.free_replays = 2
    c.sample.num_samples = 20
    c.sample.num_steps = 3
    c.sample.batch_size = 10
    c.sample.start = 'uniform'
    c.sample.neighbour_pool = 256
    c.analysis.resolution = 9
    c.schedule.warmup_steps = 0  # so a 4-step run really moves the parameters
    c.robust_watch.enabled = False  # tests that watch turn it on (with data.validation_size)
    c.data.validation_size = 0
    c.robust_watch.num_examples = 32
    c.robust_watch.num_steps = 2
  return c


def add_eval_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Keys of the clean accuracy during training and of --mode=evaluate (jeat_jax.evaluate)."""
  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 10000      # the first test images, as RobustBench
  c.eval.first_example = 0         # --mode=evaluate: test images first_example .. + num_examples
  c.eval.batch_size = 500
  c.eval.eps = 8 / 255
  c.eval.step_size = 2 / 255
  # fgsm, pgd20, pgd50 (CE), energy1, energyk (Eq. 18), cw_l2 (c = 0.2), cw_linf (PGD on the
  # CW margin), autoattack (eval.autoattack_version), autoattack_plus (AA+), autoattack_rand
  c.eval.attacks = 'fgsm,pgd20,pgd50,energy1,energyk,cw_l2,cw_linf,autoattack'
  c.eval.pgd_restarts = 1
  c.eval.energy_steps = 20         # k of energyk
  c.eval.cw_c = 0.2
  c.eval.cw_steps = 100
  c.eval.cw_lr = 0.01
  c.eval.autoattack_num_examples = 0  # > 0: the AutoAttacks on the first this many only (0: all)
  c.eval.autoattack_plus_num_examples = 0  # > 0: autoattack_plus on the first this many only
                                          # (0: as eval.autoattack_num_examples)
  c.eval.autoattack_version = 'standard'  # of 'autoattack': standard | plus | rand (test-time noise)
  c.eval.test_noise_std = 0.0      # > 0: the model adds N(0, s^2) to inputs at test time
  c.eval.pgd_steps_scale = 1.0     # < 1 shortens every iterative attack (smoke tests only)
  c.eval.unroll = 1                # > 1 unrolls attack loops (faster on XLA:CPU)
  c.eval.audit = True
  c.eval.audit_num_examples = 200
  c.eval.seed = 0
  c.eval.checkpoint = 'latest'     # latest | best (robust_watch's best state, WORKDIR/best/)
  return c


def add_sample_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Keys of --mode=sample (jeat_jax.generation). The paper gives no step count or size."""
  c.sample = ml_collections.ConfigDict()
  c.sample.objective = 'eq17'      # eq17: E(x,y) | eq16: E(x,y) - E(x) | unconditional: E(x)
  c.sample.start = 'gaussian'      # gaussian: N(mu_y, Sigma_y) of the train set | uniform | buffer
  c.sample.num_samples = 1000      # balanced over classes
  c.sample.num_steps = 100
  c.sample.step_size = 1.0
  c.sample.noise_std = 0.01
  c.sample.clip = True             # keep chains in [0, 1]
  c.sample.grad_clamp = 0.0        # > 0: clamp each gradient entry to [-c, c] (EB-JDAT's chain)
  c.sample.batch_size = 250
  c.sample.record_gradient_norms = True
  c.sample.gaussian_cache = ''     # the class Gaussians' fit; '': <workdir>/class_gaussian_*.npz
  c.sample.seed = 0
  c.sample.subdir = 'samples'      # output directory inside the workdir (fid reads it too)
  c.sample.unroll = 1              # > 1 unrolls the chain (faster on XLA:CPU)
  c.sample.steps_per_call = 0      # > 0: the chain as jitted pieces of this many steps
  c.sample.neighbours = 10         # Fig. 7: k nearest training images by SSIM (0: skip)
  c.sample.neighbour_queries = 10  # generated images shown (one per class, in class order)
  c.sample.neighbour_pool = 0      # > 0: search only the first N training images
  c.fid = ml_collections.ConfigDict()
  c.fid.weights = ''               # pytorch-fid .pth (has the IS head) or fid-helper .pt; '': pip
  c.fid.reference = ''             # '': the training set of `data`; or any image / stats .npz
  c.fid.reference_key = ''
  c.fid.reference_dir = ''         # reference statistics (fid_stats/), TFDS images; '': <workdir>
  c.fid.max_reference = 0          # > 0: a fixed random subset of the reference images
  c.fid.batch_size = 50
  c.analysis = ml_collections.ConfigDict()
  c.analysis.image_index = 0       # test image at the centre of the energy landscape
  c.analysis.radius = 16 / 255     # landscape half-width, l_inf pixel units
  c.analysis.resolution = 41
  c.analysis.seed = 0
  c.analysis.dynamics_period_steps = 0  # Fig. 3 x-axis: 0 per epoch (paper), > 0 per N steps
  return c
