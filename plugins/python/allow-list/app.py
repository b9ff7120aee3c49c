"""The component's `rule` export: the configuration check.

componentize-py looks for the exported interface `rule` as the class `Rule`
in this module, and for its resource `targeting` as the class `Targeting` in
the module named after the interface (rule.py).
"""

from wit_world import exports

from flaghost_rule import errors_as_err
from rule import parse


class Rule(exports.Rule):
    @errors_as_err
    def check_config(self, flag_key, variants, config):
        parse(variants, config)
