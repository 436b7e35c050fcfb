"""Flags generated from the config dataclasses: every field reachable, aliases, presets, the warmup default."""

import dataclasses
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from slmjax import cli
from slmjax.config import ModelConfig, TrainConfig

cli.define_model_flags()
cli.define_train_flags()
FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def parse():
  def parse(*argv):
    FLAGS.unparse_flags()
    FLAGS(['prog', *argv])
  yield parse
  FLAGS.unparse_flags()


def test_every_config_field_has_a_flag_with_its_help():
  for cls in (ModelConfig, TrainConfig):
    for field in dataclasses.fields(cls):
      flag = FLAGS[cli.FLAG_ALIASES.get(field.name, field.name)]
      assert flag.help.endswith(field.metadata['help']), field.name  # enums prefix their choices


def test_fields_without_hand_written_flags_are_reachable(parse):
  parse('--arch=moe', '--router=sigmoid', '--k=1', '--norouter_renormalize', '--rope_theta=500000',
        '--norm_eps=1e-5', '--embed_scale', '--logit_softcap=30', '--attn_softcap=50', '--experts=16',
        '--shared_experts=1')
  cfg = cli.model_config_from_flags()
  assert (cfg.router, cfg.top_k, cfg.router_renormalize, cfg.rope_theta, cfg.norm_eps) == (
      'sigmoid', 1, False, 500000.0, 1e-5)
  assert (cfg.embed_scale, cfg.logit_softcap, cfg.attn_softcap, cfg.n_experts, cfg.n_shared_experts) == (
      True, 30.0, 50.0, 16, 1)
  parse('--b1=0.8', '--b2=0.99', '--steps=50')
  assert (cli.train_config_from_flags().b1, cli.train_config_from_flags().b2) == (0.8, 0.99)


def test_dense_arch_and_capacity_zero_is_dropless(parse):
  parse()
  assert cli.model_config_from_flags().n_experts == 0  # --arch=dense is the default
  parse('--experts=4')  # without --arch=moe: an error, not a dense model that ignores it
  with pytest.raises(ValueError, match='--experts shapes the experts of --arch=moe.*add --arch=moe'):
    cli.model_config_from_flags()
  parse('--arch=moe', '--capacity_factor=0')
  cfg = cli.model_config_from_flags()
  assert cfg.capacity_factor is None and cfg.dropless and cfg.n_experts == 8
  parse('--arch=moe', '--capacity_factor=-1')  # only 0 means dropless
  with pytest.raises(ValueError, match='capacity_factor must be positive or None'):
    cli.model_config_from_flags()
  parse('--arch=moe', '--experts=0')
  with pytest.raises(ValueError, match='needs at least one expert'):
    cli.model_config_from_flags()


def test_max_seq_len_follows_seq_len(parse):
  parse('--seq_len=64')
  assert cli.model_config_from_flags().max_seq_len == 64
  parse('--seq_len=64', '--max_seq_len=128')
  assert cli.model_config_from_flags().max_seq_len == 128


def test_preset_takes_runtime_flags_only(parse):
  parse('--preset=mixtral-8x7b', '--capacity_factor=0', '--dtype=bfloat16')
  cfg = cli.model_config_from_flags()
  assert cfg.dropless and cfg.dtype == 'bfloat16' and cfg.n_experts == 8
  parse('--preset=mixtral-8x7b', '--d_model=64')
  with pytest.raises(ValueError, match='--d_model cannot change --preset=mixtral-8x7b'):
    cli.model_config_from_flags()


def test_train_flags_tokens_and_short_runs(parse):
  parse('--tokens=10000', '--batch_size=4', '--seq_len=64', '--warmup=5', '--data=x/*.txt')
  cfg = cli.train_config_from_flags()
  assert (cfg.steps, cfg.batch_size, cfg.seq_len, cfg.data, cfg.warmup) == (40, 4, 64, 'x/*.txt', 5)
  parse('--steps=40')  # the default warmup (100) does not fit: a tenth of the steps instead
  assert cli.train_config_from_flags().warmup == 4
  parse('--steps=500')
  assert cli.train_config_from_flags().warmup == 100
  parse('--steps=40', '--warmup=50')  # asked for explicitly: an error, not a silent change
  with pytest.raises(ValueError, match='warmup=50 must be smaller than steps=40'):
    cli.train_config_from_flags()
  parse('--tokens=10000', '--steps=5')
  with pytest.raises(ValueError, match='not both'):
    cli.train_config_from_flags()


def test_balance_flags_reach_the_config(parse):
  parse('--arch=moe', '--router_bias', '--balance=bias', '--bias_update_rate=0.01')
  cfg = cli.model_config_from_flags()
  assert (cfg.router_bias, cfg.balance, cfg.bias_update_rate, cfg.moves_selection_bias) == (True, 'bias', 0.01, True)
  parse('--preset=deepseek-v3', '--scale_down', '--balance=bias')  # a runtime field: allowed on a preset
  assert cli.model_config_from_flags().balance == 'bias'
  parse('--arch=moe', '--balance=both')  # the flags turn on the selection bias that bias|both moves
  assert cli.model_config_from_flags().router_bias
  for argv, message in [(('--arch=moe', '--balance=both', '--norouter_bias'),
                         'balance=both needs router_bias=True.*flag: --router_bias'),
                        (('--preset=mixtral-8x7b', '--balance=bias'), 'balance=bias needs router_bias=True')]:
    parse(*argv)
    with pytest.raises(ValueError, match=message) as info:
      cli.model_config_from_flags()
    assert '\n' not in str(info.value)
  with pytest.raises(flags.IllegalFlagValueError, match='value should be one of <aux_loss|bias|both>') as info:
    parse('--balance=loss_free')
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('bad', ['--balance=loss_free', '--no_such_flag=1', '--steps=many'])
def test_a_flag_absl_cannot_parse_is_one_line_and_exit_status_2(bad):
  result = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'train.py'), bad], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 2 and result.stderr.startswith('train.py: error: ') and '--helpshort' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_wsd_default_warmup_fits_the_shortest_branch(parse):
  parse('--schedule=wsd', '--branches=0.25', '--steps=160')  # the default 100 would not fit the 40-step branch
  assert cli.train_config_from_flags().warmup == 4
  parse('--steps=160')
  assert cli.train_config_from_flags().warmup == 100
