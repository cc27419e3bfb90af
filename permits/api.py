"""HTTP routes of this package."""

from fastapi import APIRouter

router = APIRouter()
