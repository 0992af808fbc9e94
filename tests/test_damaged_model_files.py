"""A model directory with a damaged weights file, given to evaluate.py / sample_pairs.py (generation.load_model), gets
an error naming the file, not safetensors' `Error while deserializing header` without one. train.py's model
directories are covered by tests/test_bad_inputs.py, truncated and foreign GGUF files by tests/test_gguf_model.py."""
import shutil

import pytest

from generation import load_model
from models import materialize_embedded_model


@pytest.mark.parametrize('damage, reason', [
    (lambda data: data[:len(data) // 2], 'incomplete metadata, file not fully covered'),
    (lambda data: data[:1000], 'invalid header length'),
    (lambda data: b'\xff' * 4096, 'header too large'),
])
def test_a_damaged_safetensors_file_in_a_model_directory_is_named(tmp_path, damage, reason):
    directory = tmp_path / 'model'
    shutil.copytree(materialize_embedded_model('embedded:tiny', tmp_path / 'local'), directory)
    weights = directory / 'model.safetensors'
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=rf'{weights} is not a readable safetensors file \(Error while deserializing '
                                         rf'header: {reason}\): it is truncated or damaged; download or save the model '
                                         rf'again'):
        load_model(str(directory), local_dirs=[str(tmp_path / 'local')])
