"""Bodies of /v1/templates: a template version, previews, folder reloads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.schemas.common import Address, JsonObject, Text, no_line_breaks, normalize_address
from mailqueue.templating import check_locale

# Template versions are PostgreSQL integers: a larger one can never exist, and must not reach a query.
MAX_VERSION = 2**31 - 1


class TemplateBody(BaseModel):
    """A template version's content. Names starting with `_` are layouts and partials (no subject needed)."""

    model_config = ConfigDict(extra="forbid")

    locale: str = Field(default="", max_length=35, description="'' is the default variant; 'de', 'pt-BR', ...")
    subject: Text | None = Field(default=None, max_length=2000)
    html: Text | None = Field(default=None, max_length=1_000_000)
    text: Text | None = Field(default=None, max_length=1_000_000)
    default_from: Address | None = None
    default_from_name: str | None = Field(default=None, max_length=200)
    description: Text | None = Field(default=None, max_length=2000)
    sample_data: JsonObject | None = Field(default=None, description="Data for previews; checked to render on save")

    @field_validator("default_from")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return normalize_address(value) if value is not None else None

    @field_validator("default_from_name")
    @classmethod
    def _from_name(cls, value: str | None) -> str | None:
        if value is not None:
            no_line_breaks(value, "default_from_name")
        return value

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str) -> str:
        return check_locale(value)

    def check_parts(self, name: str) -> None:
        if self.html is None and self.text is None:
            raise ValueError("a template needs html or text")
        if not name.startswith("_") and not (self.subject or "").strip():
            raise ValueError("subject is required (only layouts and partials, named '_...', go without one)")


class TemplateIn(TemplateBody):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "welcome",
                    "subject": "Welcome, {{ name }}",
                    "html": '{% extends "_Layout" %}{% block content %}<p>Hello {{ name }}!</p>{% endblock %}',
                    "sample_data": {"name": "Ann"},
                }
            ]
        },
    )
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="after")
    def _body(self) -> TemplateIn:
        self.check_parts(self.name)
        return self


class TemplateOut(BaseModel):
    name: str
    locale: str
    version: int
    subject: str
    html: str | None
    text: str | None
    default_from: str | None
    default_from_name: str | None
    description: str | None
    sample_data: dict[str, Any] | None
    is_active: bool
    is_current: bool
    created_by: str | None
    created_at: datetime
    updated_at: datetime


class TemplatePinOut(BaseModel):
    name: str
    locale: str
    version: int


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: JsonObject | None = Field(default=None, description="Template data; the stored sample data when absent")
    locale: str | None = Field(default=None, max_length=35)
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION, description="A stored version; the current one when absent")

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str | None) -> str | None:
        return check_locale(value)


class PreviewOut(BaseModel):
    subject: str
    html: str | None
    text: str | None
    template: TemplatePinOut
    dependencies: list[TemplatePinOut]
    data_source: str = Field(description="'request' or 'sample_data'")


class ReloadOut(BaseModel):
    directory: str
    created: list[TemplatePinOut]
    unchanged: list[TemplatePinOut]
