"""Our attention terms inside other training frameworks. Each module imports its framework, which stays an optional
extra: `pip install 'ral-workbench[trl]'` for `ral_core.integrations.trl`. Nothing else in ral_core imports them."""
