"""The pipeline as a list of stages, each a library function with typed inputs
(:class:`~tyr.pipeline.settings.PipelineSettings`, :class:`~tyr.pipeline.settings.RunKeys`), its own
artifacts and key, and a done check. :mod:`tyr.recipes.pipeline` validates the config, builds the
settings and keys once and calls them in this order:

====================  ==========================================  ===========================================
stage                 function                                    artifacts (key)
====================  ==========================================  ===========================================
prepare               :func:`prepare.prepare`                     ``teacher.safetensors`` (prepare record)
build + search        :func:`search.build_and_search`             ``iter<i>/supernet/``, ``search_state.json``,
(+ re-prune)                                                      ``history.jsonl``, ``reprune/supernet/``
                                                                  (search record)
dense row             :func:`evaluate.evaluate_dense`             ``results_dense.json`` (eval settings + model)
comparisons           :func:`compare.searched_forms`,             ``uniform_reprune/supernet/``, ``owl.json``
                      :func:`compare.comparison_forms`            (search key)
evaluate              :func:`evaluate.evaluate_forms`,            ``results_<form>.json`` (eval settings + form),
                      :func:`evaluate.plot_run`                   ``allocation.json``, ``*.png``
export                :func:`export.export_stage`                 ``hf_model/``, ``export.json`` (search key +
                                                                  chosen form)
recover               :func:`recover.recover_stage`               ``recover/<mode>-<key>/`` (recovery settings,
                                                                  student, teacher)
====================  ==========================================  ===========================================

The run directory's layout (which stage owns which file, the stage records, ``redo``) is
:mod:`tyr.pipeline.layout`; ``docs/architecture.md`` draws the whole picture.
"""
