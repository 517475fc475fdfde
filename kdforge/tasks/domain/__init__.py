"""Taxonomy-adaptive cross-domain adaptation (source old classes -> shifted target with new classes)."""

from kdforge.tasks.domain.data import DomainData, build_domains, class_mix, domain_shift, mix_regions
from kdforge.tasks.domain.task import DomainBatch, DomainTask, evaluate_target

__all__ = ["DomainBatch", "DomainData", "DomainTask", "build_domains", "class_mix", "domain_shift",
           "evaluate_target", "mix_regions"]
