"""Model files from an untrusted or broken copy (cut short, garbage) get an error naming the file, not a crash deep
in a parser: GGUF files and Hugging Face directories given to evaluate.py / sample_pairs.py (generation.load_model).
train.py's model directories are covered by tests/test_bad_inputs.py."""
import shutil

import numpy as np
import pytest

from generation import load_model
from models import materialize_embedded_model


def small_gguf(path):
    """A GGUF file (llama architecture) holding one 320 × 64 float32 tensor: 82 KB of weights after the header."""
    import gguf
    writer = gguf.GGUFWriter(str(path), 'llama')
    writer.add_block_count(1)
    writer.add_tensor('token_embd.weight', np.zeros((320, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize('keep', [0.5, 0.999])
def test_a_truncated_gguf_file_is_named(tmp_path, keep):
    """Cut to half, or short of its last bytes: gguf's reader fails on the last tensor's data (`cannot reshape array
    of size 10220 into shape (320,64)`, or a numpy view error); the error names the file and says what to do."""
    path = small_gguf(tmp_path / 'model.gguf')
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf'^{path} could not be read as a GGUF model \(ValueError: .+\): the file is '
                                         rf'truncated or damaged \(download it again\)'):
        load_model(str(path), local_dirs=[str(tmp_path / 'local')])


def test_a_garbage_gguf_file_is_named(tmp_path):
    path = tmp_path / 'model.gguf'
    path.write_bytes(b'\x00' * 4096)
    with pytest.raises(ValueError, match=rf'{path} does not start with the GGUF magic bytes'):
        load_model(str(path), local_dirs=[str(tmp_path / 'local')])


def test_a_truncated_safetensors_file_in_a_model_directory_is_named(tmp_path):
    directory = tmp_path / 'model'
    shutil.copytree(materialize_embedded_model('embedded:tiny', tmp_path / 'local'), directory)
    weights = directory / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf'{weights} is not a readable safetensors file \(Error while deserializing '
                                         rf'header: incomplete metadata, file not fully covered\): it is truncated'):
        load_model(str(directory), local_dirs=[str(tmp_path / 'local')])
