"""``moe_masked_lm``: fairseq's masked-LM loss (RoBERTa pretraining) plus the expert layers' aux losses."""

from fairseq.criterions import register_criterion
from fairseq.criterions.masked_lm import MaskedLmConfig, MaskedLmLoss

from .moe_aux import add_aux, reduce_aux


@register_criterion("moe_masked_lm", dataclass=MaskedLmConfig)
class MoEMaskedLmLoss(MaskedLmLoss):
    """The logged ``loss`` (and ``ppl``) stay the masked-LM loss; ``moe_aux`` and the routing
    statistics are logged beside it (see moe_aux.py)."""

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        return add_aux(loss, model, sample_size, logging_output), sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        MaskedLmLoss.reduce_metrics(logging_outputs)
        reduce_aux(logging_outputs)
