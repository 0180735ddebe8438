"""Resuming across the 'auto' model fields: config.json records what dtype and channel_multiple
'auto' meant where the run started (training/workdir.py), so a workdir resumes under 'auto' where
that computes the same, and is refused, naming the field, where it would not."""

import json

import pytest

from pyramidnet_jax.models import platforms
from pyramidnet_jax.training import workdir
from tests import helpers


def stored(tmp_path) -> dict:
  return json.loads((tmp_path / workdir.CONFIG_FILE).read_text())


def write_old_workdir(tmp_path) -> None:
  """config.json as runs wrote it before 'auto' and bn_group_size: float32, exact widths."""
  config = json.loads(helpers.tiny_config().to_json())
  config['model'].update(dtype='float32', channel_multiple=1)
  del config['model']['bn_group_size']
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(config))


def test_a_run_records_what_auto_means_on_its_platform(tmp_path):
  workdir.record_config(str(tmp_path), helpers.tiny_config())
  model = stored(tmp_path)['model']
  assert (model['dtype'], model['channel_multiple'], model['bn_group_size']) == ('float32', 1, 0)


def test_an_old_cpu_workdir_resumes_under_the_new_defaults_on_a_cpu(tmp_path):
  write_old_workdir(tmp_path)
  workdir.record_config(str(tmp_path), helpers.tiny_config())  # 'auto', 'auto', 0: no error.


@pytest.mark.parametrize('field,value', [('dtype', 'bfloat16'), ('channel_multiple', 8),
                                         ('bn_group_size', 8)])
def test_an_old_workdir_refuses_what_computes_otherwise(tmp_path, field, value):
  write_old_workdir(tmp_path)
  config = helpers.tiny_config(**{f'model.{field}': value})
  with pytest.raises(workdir.WorkdirError, match=f'model.{field}: ') as error:
    workdir.record_config(str(tmp_path), config)
  assert '\n' not in str(error.value)


def test_a_cpu_run_does_not_resume_as_bfloat16_on_a_gpu(tmp_path, monkeypatch):
  workdir.record_config(str(tmp_path), helpers.tiny_config())  # Started on this CPU.
  monkeypatch.setattr(platforms, 'current_platform', lambda: 'cuda')
  with pytest.raises(workdir.WorkdirError) as error:
    workdir.record_config(str(tmp_path), helpers.tiny_config())
  message = str(error.value)
  assert '\n' not in message
  assert ('model.channel_multiple: 1 in the workdir, 8 now (\'auto\' on cuda; pass the '
          "workdir's value to resume)") in message
  assert 'model.dtype: "float32" in the workdir, "bfloat16" now (\'auto\' on cuda' in message
  # With the workdir's values it resumes there, in float32 at exact widths.
  workdir.record_config(str(tmp_path), helpers.tiny_config(
      **{'model.dtype': 'float32', 'model.channel_multiple': 1}))
