# `--config KEY=VALUE` read as config.yaml would read VALUE: Snakemake parses numbers and True/False but
# leaves `null`, `true`, `~` and the values inside `{...}` strings (`cell_type_key=null` would reach the
# steps as the column name 'null').
import yaml


def yaml_scalar(value):
    """A command-line string as the YAML scalar it spells (null, a boolean, a number); else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if parsed is None or isinstance(parsed, (bool, int, float)) else value


def read_command_line_config_as_yaml(given, into):
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            read_command_line_config_as_yaml(value, into[key])
        elif isinstance(value, list):
            into[key] = [yaml_scalar(v) for v in value]
        else:
            into[key] = yaml_scalar(value)


read_command_line_config_as_yaml(workflow.config_settings.config, config)
