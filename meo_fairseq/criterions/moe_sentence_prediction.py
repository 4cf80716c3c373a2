"""``moe_sentence_prediction``: fairseq's sentence_prediction loss (GLUE fine-tuning:
classification, or regression with ``--regression-target``) plus the expert layers' aux losses."""

from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import (
    SentencePredictionConfig,
    SentencePredictionCriterion,
)

from .moe_aux import add_aux, reduce_aux


@register_criterion("moe_sentence_prediction", dataclass=SentencePredictionConfig)
class MoESentencePredictionCriterion(SentencePredictionCriterion):
    """The logged ``loss`` and ``accuracy`` (and the GLUE metrics fairseq reports with
    ``--report-*``) stay those of the task; ``moe_aux`` and the routing statistics are logged beside
    them (see moe_aux.py)."""

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        return add_aux(loss, model, sample_size, logging_output), sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        SentencePredictionCriterion.reduce_metrics(logging_outputs)
        reduce_aux(logging_outputs)
