"""Purposes of secondary use a permit may be issued for: EHDS Art 53(1), final numbering.

A permit ticks one or more of these purposes and justifies them (Art 68). Art 54 lists the
prohibited uses; they are never a valid purpose and so have no value here. Values are stable
machine-readable slugs; ``ARTICLE`` gives the provision each one stands for.
"""

from __future__ import annotations

from enum import StrEnum


class Purpose(StrEnum):
    PUBLIC_HEALTH = "public_health"
    POLICY_MAKING = "policy_making"
    STATISTICS = "statistics"
    EDUCATION = "education"
    SCIENTIFIC_RESEARCH = "scientific_research"
    PRODUCT_DEVELOPMENT = "product_development"
    AI_TRAINING_EVALUATION = "ai_training_evaluation"
    IMPROVING_CARE = "improving_care"


ARTICLE: dict[Purpose, str] = {
    Purpose.PUBLIC_HEALTH: "Art 53(1)(a): public interest in public or occupational health",
    Purpose.POLICY_MAKING: "Art 53(1)(b): policy making and regulatory activities",
    Purpose.STATISTICS: "Art 53(1)(c): statistics (official, national, multinational, Union)",
    Purpose.EDUCATION: "Art 53(1)(d): education or teaching in health or care sectors",
    Purpose.SCIENTIFIC_RESEARCH: "Art 53(1)(e): scientific research related to health or care",
    Purpose.PRODUCT_DEVELOPMENT: "Art 53(1)(e)(i): development and innovation of products "
    "or services",
    Purpose.AI_TRAINING_EVALUATION: "Art 53(1)(e)(ii): training, testing and evaluating "
    "algorithms, including AI systems and medical devices",
    Purpose.IMPROVING_CARE: "Art 53(1)(f): improving delivery of care, treatment and provision "
    "of healthcare",
}
