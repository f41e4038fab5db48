import pytest

from engine.settings import SettingsError, load_settings, parse_params


def test_real_models_get_the_dreambooth_literature_defaults():
    s = load_settings("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert (s.mode, s.max_train_steps, s.resolution, s.num_class_images, s.prior_loss_weight) == ("lora", 800, 512, 200, 1.0)
    assert s.effective_learning_rate == 1e-4
    assert s.model_copy(update={"mode": "full"}).effective_learning_rate == 5e-6
    assert s.effective_mixed_precision("cuda") == "bf16" and s.effective_mixed_precision("cpu") == "no"


def test_tiny_preset_is_small_but_explicit_settings_win(tmp_path):
    assert load_settings("tiny").resolution == 32
    config = tmp_path / "run.yaml"
    config.write_text("resolution: 64\nmax_train_steps: 7\n")
    s = load_settings("tiny", config, {"max_train_steps": 3})
    assert (s.resolution, s.max_train_steps) == (64, 3)  # config beats preset, command line beats config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_train_step": 5}, "unknown setting(s) 'max_train_step'"),
        ({"max_train_steps": -1}, "max_train_steps"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"mode": "qlora"}, "mode"),
        ({"lr_warmup_steps": 900, "max_train_steps": 10}, "exceeds max_train_steps"),
        ({"instance_prompt_mode": "caption"}, "instance_prompt_mode=caption needs curate=true"),
        ({"curate_unlocated": "crop"}, "curate_unlocated"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(overrides, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings("tiny", overrides=overrides)


def test_config_file_with_unknown_key_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("resolutoin: 64\n")
    with pytest.raises(SettingsError, match="bad.yaml: unknown setting.*resolutoin"):
        load_settings("tiny", config)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"colour": 1}', "unknown setting(s) 'colour'"),
        ('{"max_attempts": 9}', "only be set for the whole run"),
    ],
)
def test_params_column_errors_name_the_problem(text, message):
    with pytest.raises(SettingsError) as err:
        parse_params(text)
    assert message in str(err.value)


def test_params_override_one_subject_and_are_validated():
    s = load_settings("tiny")
    assert s.with_overrides(parse_params('{"lora_rank": 16}')).lora_rank == 16
    with pytest.raises(SettingsError, match="params: lora_rank"):
        s.with_overrides({"lora_rank": 0})


def test_the_vlm_engine_is_chosen_never_guessed_and_tensor_parallel_needs_vllm():
    assert load_settings("tiny").vlm_engine == "transformers"
    assert load_settings("tiny", overrides={"vlm_engine": "vllm", "vlm_tensor_parallel_size": 2,
                                            "vlm_engine_args": {"enforce_eager": True}}).vlm_engine == "vllm"  # fmt: skip
    with pytest.raises(SettingsError, match="vlm_engine"):
        load_settings("tiny", overrides={"vlm_engine": "auto"})
    with pytest.raises(SettingsError, match="vlm_tensor_parallel_size above 1 needs vlm_engine=vllm"):
        load_settings("tiny", overrides={"vlm_tensor_parallel_size": 2})
