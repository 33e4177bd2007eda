"""Reports (``vmconfine.report``): the confinement report (:mod:`~vmconfine.report.build`,
rendered by :mod:`~vmconfine.report.render`) and ``host-validate``
(:mod:`~vmconfine.report.validate`).
"""
