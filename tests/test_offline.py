"""The offline promise, checked: train, generate and export run with every network call made to fail."""
import socket

from dreambooth_offset.cli import main
from tests.tiny import flags


def test_train_generate_export_make_no_network_call(sd1_model, instance_dir, tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args else kwargs)
        raise OSError("network access attempted during an offline test")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)

    out = tmp_path / "lora"
    assert main(flags(sd1_model, instance_dir, out, max_train_steps=2, optimizer="adamw", report_to="tensorboard",
                      validation_prompt=["a photo of sks dog"], validation_steps=2, num_validation_images=1,
                      num_inference_steps=2)) == 0
    assert main(["generate", "--pretrained_model_name_or_path", str(sd1_model), "--lora", str(out), "--prompt", "a",
                 "--num_images", "1", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "gen")]) == 0
    assert main(["export", str(out), "-o", str(tmp_path / "webui.safetensors")]) == 0
    assert attempts == []
