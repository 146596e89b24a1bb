"""Checkpoints of the whole TrainState with orbax, written atomically.

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact. The workdir
also records which recipe and model wrote it (`run_info.json`), and a workdir
written by another recipe or model is refused before any restore is tried.
"""
import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from jeat_jax import models
from jeat_jax.errors import WorkdirError

RUN_INFO = 'run_info.json'


def run_identity(config) -> dict:
  """What a checkpoint's arrays depend on: the recipe, the dataset and the model."""
  m = config.model
  return {'recipe': config.recipe, 'dataset': config.dataset,
          'model': {'depth': m.depth, 'width': m.width, 'norm': m.norm}}


def check_run_info(workdir: str, config) -> None:
  """Writes run_info.json on a new workdir; refuses one written by another run."""
  path = os.path.join(workdir, RUN_INFO)
  mine = run_identity(config)
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    if theirs != mine:
      raise WorkdirError(
          f'workdir {workdir} holds a run of recipe {theirs.get("recipe")!r} with '
          f'{theirs.get("dataset")} / {theirs.get("model")}; this config is recipe '
          f'{mine["recipe"]!r} with {mine["dataset"]} / {mine["model"]}. Use another --workdir.')
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    # Atomic: another process of a multi-host run may read it while this one writes.
    with open(path + '.tmp', 'w') as f:
      json.dump(mine, f, indent=2)
    os.replace(path + '.tmp', path)


class Checkpointer:
  """Saves every `checkpoint_every_steps` (called by the loop) and restores the latest."""

  def __init__(self, workdir: str, config, for_training: bool = True):
    if for_training:
      check_run_info(workdir, config)
    elif not os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise WorkdirError(f'no checkpoints in {workdir}: train there first '
                         f'(python main.py --config=... --workdir={workdir})')
    else:
      check_run_info(workdir, config)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                          options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, state) -> None:
    step = int(state.step)
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state.checkpoint_items()))
    self._manager.wait_until_finished()
    logging.info('saved checkpoint at step %d', step)

  def restore_latest(self, state):
    """`state` with the latest checkpoint's values (shapes and shardings of `state`), or None."""
    step = self.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.checkpoint_items())
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    logging.info('restored checkpoint at step %d', step)
    return state.replace(**restored)
