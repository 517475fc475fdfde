"""Taxonomy-adaptive cross-domain adaptation (source old classes -> shifted target with new classes)."""

from kdforge.tasks.domain.data import DomainData, build_domains, domain_shift

__all__ = ["DomainData", "build_domains", "domain_shift"]
