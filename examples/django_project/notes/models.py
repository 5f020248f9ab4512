"""One model, to show migrate, inserts and queries through safepg."""

from __future__ import annotations

from django.db import models


class Note(models.Model):
    text: models.CharField[str, str] = models.CharField(max_length=200)

    def __str__(self) -> str:
        return str(self.text)
