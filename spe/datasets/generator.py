"""Deterministic synthetic OMOP CDM 5.4 data.

Contract of ``generate(out, persons, seed, fmt)``:

* writes one file per table of ``TABLES`` into ``out`` (``person.csv`` ... or
  ``person.parquet`` ...), every official CDM 5.4 column in official order with the spec's
  types (optional columns the generator does not model are empty);
* the output depends only on ``(persons, seed, fmt)``: the same arguments give byte-identical
  files (persons are generated in fixed-size chunks, each with its own seeded generator);
* memory stays bounded by the chunk size, whatever ``persons`` is;
* ``concept`` holds every concept id the other tables use, with its standard name (public
  reference data: researchers join it to read names instead of ids);
* writes ``spe-metadata.yaml`` beside the data: the bounds and public value sets the generator
  knows to hold for every row it wrote (a data holder's declaration, see ``defaults``).

Distributions: an age pyramid, sexes 8507/8532 (a few 0), Zipf-like concept frequencies over
realistic concept ids, a gamma-Poisson number of events per person rising with age (about 5
visits, 3 conditions, 3 drug exposures and 10 measurements per person), log-normal measurement
values with a few outliers and missing values, and about 4 % deaths.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from spe.datasets.omop_spec import TableSpec, table_spec

Format = Literal["csv", "parquet"]
TABLES = ("person", "observation_period", "visit_occurrence", "condition_occurrence",
          "drug_exposure", "measurement", "death", "concept")
#: Persons per chunk. Part of the output's definition: changing it changes the data.
CHUNK_PERSONS = 25_000
END = date(2024, 12, 31)
OBS_MIN = date(2005, 1, 1)
MAX_VALUE = 1000.0

_EPOCH = date(1970, 1, 1)
_END_DAY = (END - _EPOCH).days
_OBS_MIN_DAY = (OBS_MIN - _EPOCH).days
_ARROW_TYPES = {"BIGINT": pa.int64(), "DOUBLE": pa.float64(), "DATE": pa.date32(),
                "TIMESTAMP": pa.timestamp("s"), "VARCHAR": pa.string()}

Columns = dict[str, Any]


# Vocabulary ------------------------------------------------------------------------------
# Realistic-looking standard concept ids with their source codes. Frequencies are Zipf-like in
# list order.


def zipf(k: int, s: float = 1.1) -> np.ndarray:
    """Zipf-like probabilities over k ranks."""
    w = 1.0 / np.arange(1, k + 1) ** s
    return np.asarray(w / w.sum())


AGE_BAND_WEIGHTS = np.array([11, 11, 12, 13, 13, 14, 13, 8, 4, 1], dtype=float)
AGE_BAND_WEIGHTS /= AGE_BAND_WEIGHTS.sum()
GENDER_CONCEPTS = np.array([8507, 8532, 0], dtype=np.int64)
GENDER_P = np.array([0.4900, 0.5095, 0.0005])
GENDER_SOURCE = ["M", "F", "U"]
RACE_CONCEPTS = np.array([8527, 8516, 8515, 0], dtype=np.int64)
RACE_P = np.array([0.78, 0.08, 0.06, 0.08])
ETHNICITY_CONCEPTS = np.array([38003564, 38003563, 0], dtype=np.int64)
ETHNICITY_P = np.array([0.90, 0.07, 0.03])
CARE_SITES = 40
EHR = 32817
EHR_PRESCRIPTION = 32838
LAB = 32856
VISIT_CONCEPTS = np.array([9202, 9203, 9201], dtype=np.int64)  # outpatient, ER, inpatient
VISIT_P = np.array([0.82, 0.08, 0.10])
VISIT_SOURCE = ["OP", "ER", "IP"]
CONDITION_STATUS = np.array([32902, 32908], dtype=np.int64)  # primary, secondary diagnosis

_CONDITIONS = [
    (320128, "I10"), (201826, "E11.9"), (432867, "E78.5"), (4112343, "J02.9"),
    (260139, "J20.9"), (440383, "F32.9"), (80180, "M19.90"), (317009, "J45.909"),
    (255573, "J44.9"), (433736, "E66.9"), (313217, "I48.91"), (317576, "I25.10"),
    (257012, "J32.9"), (81902, "N39.0"), (254761, "R05"), (378253, "R51"),
    (77670, "R07.9"), (4266367, "J11.1"), (28060, "J02.0"), (439777, "D64.9"),
    (318736, "G43.909"), (319835, "I50.9"), (46271022, "N18.9"), (80502, "M81.0"),
    (381591, "I67.9"), (4329847, "I21.9"), (192671, "K92.2"), (437663, "R50.9"),
    (443392, "C80.1"), (440417, "I26.99"),
]
CONDITIONS = _CONDITIONS
CONDITION_IDS = np.array([c for c, _ in _CONDITIONS], dtype=np.int64)
CONDITION_SOURCE = [s for _, s in _CONDITIONS]

_ORAL, _INHAL, _SUBCUT = 4132161, 45956874, 4142048
_DRUGS = [
    (1503297, "6809", _ORAL), (1308216, "29046", _ORAL), (1545958, "83367", _ORAL),
    (1332418, "17767", _ORAL), (1125315, "161", _ORAL), (1177480, "5640", _ORAL),
    (1713332, "723", _ORAL), (1307046, "6918", _ORAL), (974166, "5487", _ORAL),
    (1112807, "1191", _ORAL), (1154343, "435", _INHAL), (1539403, "36567", _ORAL),
    (1310149, "11289", _ORAL), (1551099, "8640", _ORAL), (739138, "36437", _ORAL),
    (1367500, "52175", _ORAL), (1314002, "1202", _ORAL), (1502905, "274783", _SUBCUT),
    (948078, "40790", _ORAL), (923645, "7646", _ORAL), (1738521, "3640", _ORAL),
    (1797513, "2551", _ORAL), (1118084, "140587", _ORAL), (1124957, "7804", _ORAL),
]
DRUGS = _DRUGS
DRUG_IDS = np.array([d for d, _, _ in _DRUGS], dtype=np.int64)
DRUG_SOURCE = [s for _, s, _ in _DRUGS]
DRUG_ROUTE_IDS = np.array([r for _, _, r in _DRUGS], dtype=np.int64)
_ROUTE_NAMES = {_ORAL: "oral", _INHAL: "inhalation", _SUBCUT: "subcutaneous"}
DRUG_ROUTE_SOURCE = [_ROUTE_NAMES[r] for _, _, r in _DRUGS]
DAYS_SUPPLY = np.array([30, 90, 7, 10, 14, 28], dtype=np.int64)
DAYS_SUPPLY_P = np.array([0.45, 0.20, 0.10, 0.10, 0.10, 0.05])
REFILLS_P = np.array([0.40, 0.20, 0.15, 0.10, 0.10, 0.05])

_NAN = float("nan")
# concept, LOINC, unit concept, unit source, mean, sd, normal low, normal high
_MEASUREMENTS = [
    (3004249, "8480-6", 8876, "mm[Hg]", 128, 18, 90, 140),
    (3012888, "8462-4", 8876, "mm[Hg]", 79, 11, 60, 90),
    (3027018, "8867-4", 8541, "/min", 74, 12, 60, 100),
    (3025315, "29463-7", 9529, "kg", 76, 17, _NAN, _NAN),
    (3004501, "2345-7", 8840, "mg/dL", 105, 28, 70, 99),
    (3016723, "2160-0", 8840, "mg/dL", 0.95, 0.3, 0.6, 1.2),
    (3000963, "718-7", 8713, "g/dL", 13.8, 1.6, 12, 17.5),
    (3036277, "8302-2", 8582, "cm", 168, 11, _NAN, _NAN),
    (3038553, "39156-5", 9531, "kg/m2", 27, 5, 18.5, 25),
    (3004410, "4548-4", 8554, "%", 5.9, 1.1, 4, 5.6),
    (3027114, "2093-3", 8840, "mg/dL", 195, 38, 0, 200),
    (3019550, "2951-2", 8753, "mmol/L", 139, 3, 135, 145),
    (3023103, "2823-3", 8753, "mmol/L", 4.2, 0.45, 3.5, 5.1),
    (3013682, "3094-0", 8840, "mg/dL", 15, 5, 7, 20),
    (3007070, "2085-9", 8840, "mg/dL", 52, 14, 40, 60),
    (3028437, "13457-7", 8840, "mg/dL", 115, 33, 0, 100),
    (3022192, "2571-8", 8840, "mg/dL", 140, 70, 0, 150),
    (3020891, "8310-5", 586323, "Cel", 36.8, 0.4, 36.1, 37.2),
    (3024171, "9279-1", 8541, "/min", 16, 3, 12, 20),
    (3024561, "1751-7", 8713, "g/dL", 4.1, 0.4, 3.5, 5.0),
    (3013721, "1920-8", 8645, "U/L", 25, 10, 10, 40),
    (3006923, "1742-6", 8645, "U/L", 24, 12, 7, 56),
]
MEASUREMENTS = _MEASUREMENTS
MEASUREMENT_IDS = np.array([m[0] for m in _MEASUREMENTS], dtype=np.int64)
MEASUREMENT_SOURCE = [m[1] for m in _MEASUREMENTS]
M_UNIT = np.array([m[2] for m in _MEASUREMENTS], dtype=np.int64)
M_UNIT_SOURCE = [m[3] for m in _MEASUREMENTS]
_MEAN = np.array([m[4] for m in _MEASUREMENTS], dtype=float)
_CV = np.array([m[5] for m in _MEASUREMENTS], dtype=float) / _MEAN
M_SIGMA = np.sqrt(np.log1p(_CV**2))  # log-normal with the given mean and sd
M_MU = np.log(_MEAN) - M_SIGMA**2 / 2
M_LOW = np.array([m[6] for m in _MEASUREMENTS], dtype=float)
M_HIGH = np.array([m[7] for m in _MEASUREMENTS], dtype=float)


# The vocabulary: every concept the generator writes, with its standard name, so researchers
# join ``concept`` (public reference data) to read names instead of ids.
_CONDITION_NAMES = [
    "Essential hypertension", "Type 2 diabetes mellitus without complication",
    "Hyperlipidemia", "Acute viral pharyngitis", "Acute bronchitis", "Depressive disorder",
    "Osteoarthritis", "Asthma", "Chronic obstructive lung disease", "Obesity",
    "Atrial fibrillation", "Coronary arteriosclerosis", "Chronic sinusitis",
    "Urinary tract infectious disease", "Cough", "Headache", "Chest pain", "Influenza",
    "Streptococcal sore throat", "Anemia", "Migraine", "Congestive heart failure",
    "Chronic kidney disease", "Osteoporosis", "Cerebrovascular disease",
    "Acute myocardial infarction", "Gastrointestinal hemorrhage", "Fever",
    "Malignant neoplastic disease", "Pulmonary embolism",
]
_DRUG_NAMES = [
    "metformin", "lisinopril", "atorvastatin", "amlodipine", "acetaminophen", "ibuprofen",
    "amoxicillin", "metoprolol", "hydrochlorothiazide", "aspirin", "albuterol", "simvastatin",
    "warfarin", "prednisone", "sertraline", "losartan", "atenolol", "insulin glargine",
    "pantoprazole", "omeprazole", "doxycycline", "ciprofloxacin", "celecoxib", "oxycodone",
]
_MEASUREMENT_NAMES = [
    "Systolic blood pressure", "Diastolic blood pressure", "Heart rate", "Body weight",
    "Glucose [Mass/volume] in Serum or Plasma", "Creatinine [Mass/volume] in Serum or Plasma",
    "Hemoglobin [Mass/volume] in Blood", "Body height", "Body mass index (BMI)",
    "Hemoglobin A1c/Hemoglobin.total in Blood", "Cholesterol [Mass/volume] in Serum or Plasma",
    "Sodium [Moles/volume] in Serum or Plasma", "Potassium [Moles/volume] in Serum or Plasma",
    "Urea nitrogen [Mass/volume] in Serum or Plasma", "HDL Cholesterol",
    "LDL Cholesterol", "Triglyceride [Mass/volume] in Serum or Plasma", "Body temperature",
    "Respiratory rate", "Albumin [Mass/volume] in Serum or Plasma",
    "Aspartate aminotransferase [Enzymatic activity/volume]",
    "Alanine aminotransferase [Enzymatic activity/volume]",
]
_OTHER_CONCEPTS = [  # (id, name, domain, vocabulary, class, code)
    (0, "No matching concept", "Metadata", "None", "Undefined", "No matching concept"),
    (8507, "MALE", "Gender", "Gender", "Gender", "M"),
    (8532, "FEMALE", "Gender", "Gender", "Gender", "F"),
    (8527, "White", "Race", "Race", "Race", "5"),
    (8516, "Black or African American", "Race", "Race", "Race", "3"),
    (8515, "Asian", "Race", "Race", "Race", "2"),
    (38003564, "Not Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity",
     "Not Hispanic"),
    (38003563, "Hispanic or Latino", "Ethnicity", "Ethnicity", "Ethnicity", "Hispanic"),
    (9202, "Outpatient Visit", "Visit", "Visit", "Visit", "OP"),
    (9203, "Emergency Room Visit", "Visit", "Visit", "Visit", "ER"),
    (9201, "Inpatient Visit", "Visit", "Visit", "Visit", "IP"),
    (32817, "EHR", "Type Concept", "Type Concept", "Type Concept", "OMOP4976890"),
    (32838, "EHR prescription", "Type Concept", "Type Concept", "Type Concept",
     "OMOP4976911"),
    (32856, "Lab", "Type Concept", "Type Concept", "Type Concept", "OMOP4976929"),
    (32902, "Primary diagnosis", "Condition Status", "Condition Status", "Condition Status",
     "OMOP4976972"),
    (32908, "Secondary diagnosis", "Condition Status", "Condition Status", "Condition Status",
     "OMOP4976978"),
    (4132161, "Oral", "Route", "SNOMED", "Qualifier Value", "26643006"),
    (45956874, "Inhalation", "Route", "SNOMED", "Qualifier Value", "447694001"),
    (4142048, "Subcutaneous", "Route", "SNOMED", "Qualifier Value", "34206005"),
    (8876, "millimeter mercury column", "Unit", "UCUM", "Unit", "mm[Hg]"),
    (8541, "per minute", "Unit", "UCUM", "Unit", "/min"),
    (9529, "kilogram", "Unit", "UCUM", "Unit", "kg"),
    (8840, "milligram per deciliter", "Unit", "UCUM", "Unit", "mg/dL"),
    (8713, "gram per deciliter", "Unit", "UCUM", "Unit", "g/dL"),
    (8582, "centimeter", "Unit", "UCUM", "Unit", "cm"),
    (9531, "kilogram per square meter", "Unit", "UCUM", "Unit", "kg/m2"),
    (8554, "percent", "Unit", "UCUM", "Unit", "%"),
    (8753, "millimole per liter", "Unit", "UCUM", "Unit", "mmol/L"),
    (586323, "degree Celsius", "Unit", "UCUM", "Unit", "Cel"),
    (8645, "unit per liter", "Unit", "UCUM", "Unit", "U/L"),
]


def vocabulary() -> list[tuple[int, str, str, str, str, str]]:
    """(concept_id, name, domain, vocabulary, class, code) of every concept the generator uses."""
    rows = list(_OTHER_CONCEPTS)
    rows += [(int(c), n, "Condition", "SNOMED", "Clinical Finding", code)
             for (c, code), n in zip(_CONDITIONS, _CONDITION_NAMES, strict=True)]
    rows += [(int(d), n, "Drug", "RxNorm", "Ingredient", code)
             for (d, code, _r), n in zip(_DRUGS, _DRUG_NAMES, strict=True)]
    rows += [(int(m[0]), n, "Measurement", "LOINC", "Clinical Observation", m[1])
             for m, n in zip(_MEASUREMENTS, _MEASUREMENT_NAMES, strict=True)]
    return rows


def _concepts() -> tuple[Columns, int]:
    rows = vocabulary()
    n = len(rows)
    start = (date(1970, 1, 1) - _EPOCH).days
    end = (date(2099, 12, 31) - _EPOCH).days
    return {
        "concept_id": np.array([r[0] for r in rows], dtype=np.int64),
        "concept_name": [r[1] for r in rows],
        "domain_id": [r[2] for r in rows],
        "vocabulary_id": [r[3] for r in rows],
        "concept_class_id": [r[4] for r in rows],
        "standard_concept": ["S"] * n,
        "concept_code": [r[5] for r in rows],
        "valid_start_date": np.full(n, start, dtype=np.int32),
        "valid_end_date": np.full(n, end, dtype=np.int32),
    }, n


def arrow_schema(spec: TableSpec) -> pa.Schema:
    """The Arrow schema of a CDM table (official names, order and types)."""
    return pa.schema([(f.name, _ARROW_TYPES[f.duckdb_type]) for f in spec.fields])


@dataclass
class GenerateStats:
    """What ``generate`` wrote: rows and wall seconds (build + write) per table."""

    persons: int
    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    total_seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


class _Writer:
    """Streams Arrow tables of one CDM table to CSV or Parquet."""

    def __init__(self, path: Path, schema: pa.Schema, fmt: Format) -> None:
        self.schema = schema
        self._writer: Any
        if fmt == "csv":
            self._writer = pacsv.CSVWriter(
                str(path), schema, write_options=pacsv.WriteOptions(quoting_style="needed"))
        else:
            self._writer = pq.ParquetWriter(str(path), schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


def _to_table(spec: TableSpec, cols: Columns, n: int) -> pa.Table:
    schema = arrow_schema(spec)
    arrays = []
    for fld in schema:
        value = cols.get(fld.name)
        if value is None:
            arrays.append(pa.nulls(n, fld.type))
        elif isinstance(value, pa.Array):
            arrays.append(value.cast(fld.type) if value.type != fld.type else value)
        elif isinstance(value, tuple):  # (values, null mask)
            arrays.append(pa.array(value[0], type=fld.type, mask=value[1]))
        else:
            arrays.append(pa.array(value, type=fld.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _days(values: np.ndarray) -> np.ndarray:
    return values.astype(np.int32)


def _choice(rng: np.random.Generator, values: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    return values[rng.choice(len(values), size=n, p=p)]


def _strings(labels: list[str], index: np.ndarray) -> pa.Array:
    return pa.array(labels, type=pa.string()).take(pa.array(index, type=pa.int32()))


def _event_counts(rng: np.random.Generator, mean: float, age_factor: np.ndarray,
                  shape: float) -> np.ndarray:
    lam = mean * age_factor * rng.gamma(shape, 1.0 / shape, size=len(age_factor))
    return rng.poisson(lam)


@dataclass
class _People:
    """Per-person values of one chunk the event tables need."""

    ids: np.ndarray
    age_factor: np.ndarray
    obs_start: np.ndarray
    obs_end: np.ndarray


class _Counters:
    """Running ids per table, so ids are unique across chunks."""

    def __init__(self) -> None:
        self.next: dict[str, int] = dict.fromkeys(TABLES, 1)

    def take(self, table: str, n: int) -> np.ndarray:
        start = self.next[table]
        self.next[table] = start + n
        return np.arange(start, start + n, dtype=np.int64)


def _persons(rng: np.random.Generator, first_id: int, n: int) -> tuple[Columns, Columns,
                                                                     Columns, _People]:
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    band = rng.choice(len(AGE_BAND_WEIGHTS), size=n, p=AGE_BAND_WEIGHTS)
    age = band * 10 + rng.integers(0, 10, size=n)
    year = END.year - age
    month = rng.integers(1, 13, size=n)
    day = rng.integers(1, 29, size=n)
    birth = (np.array(year - 1970, dtype="datetime64[Y]").astype("datetime64[M]")
             + (month - 1).astype("timedelta64[M]")).astype("datetime64[D]") + (day - 1)
    birth_day = birth.astype(np.int64)
    g = rng.choice(3, size=n, p=GENDER_P)
    person = {
        "person_id": ids,
        "gender_concept_id": GENDER_CONCEPTS[g],
        "year_of_birth": year.astype(np.int64),
        "month_of_birth": month.astype(np.int64),
        "day_of_birth": day.astype(np.int64),
        "birth_datetime": birth_day * 86400,
        "race_concept_id": _choice(rng, RACE_CONCEPTS, RACE_P, n),
        "ethnicity_concept_id": _choice(rng, ETHNICITY_CONCEPTS, ETHNICITY_P, n),
        "care_site_id": rng.integers(1, CARE_SITES + 1, size=n),
        "gender_source_value": _strings(GENDER_SOURCE, g),
    }
    # One observation period: from birth or OBS_MIN, to END (or earlier, or death).
    first = np.maximum(birth_day, _OBS_MIN_DAY)
    span = _END_DAY - first
    start = first + (rng.random(n) * 0.5 * span).astype(np.int64)
    leaves = rng.random(n) < 0.25
    end = np.where(leaves, start + ((_END_DAY - start) * rng.uniform(0.3, 1.0, n)).astype(
        np.int64), _END_DAY)
    p_death = 0.004 + 0.25 * (age / 100.0) ** 3
    dies = rng.random(n) < p_death
    death_day = start + ((end - start) * rng.uniform(0.5, 1.0, n)).astype(np.int64)
    end = np.where(dies, death_day, end)
    obs = {
        "person_id": ids,
        "observation_period_start_date": _days(start),
        "observation_period_end_date": _days(end),
        "period_type_concept_id": np.full(n, EHR, dtype=np.int64),
    }
    nd = int(dies.sum())
    cause = rng.choice(len(CONDITIONS), size=nd, p=zipf(len(CONDITIONS)))
    death = {
        "person_id": ids[dies],
        "death_date": _days(end[dies]),
        "death_datetime": end[dies] * 86400 + rng.integers(0, 86400, size=nd),
        "death_type_concept_id": np.full(nd, EHR, dtype=np.int64),
        "cause_concept_id": CONDITION_IDS[cause],
        "cause_source_value": _strings(CONDITION_SOURCE, cause),
    }
    age_factor = 0.4 + 1.2 * age / 90.0
    return person, obs, death, _People(ids, age_factor, start, end)


def _in_period(rng: np.random.Generator, people: _People, who: np.ndarray) -> np.ndarray:
    span = people.obs_end[who] - people.obs_start[who] + 1
    return people.obs_start[who] + (rng.random(len(who)) * span).astype(np.int64)


def _visits(rng: np.random.Generator, people: _People, counters: _Counters) -> tuple[Columns,
                                                                                  np.ndarray]:
    counts = _event_counts(rng, 5.0, people.age_factor, 2.0)
    who = np.repeat(np.arange(len(people.ids)), counts)
    n = len(who)
    kind = rng.choice(3, size=n, p=VISIT_P)
    start = _in_period(rng, people, who)
    los = np.where(kind == 2, 1 + rng.geometric(0.3, size=n), 0)
    end = np.minimum(start + los, np.maximum(people.obs_end[who], start))
    start_s = start * 86400 + rng.integers(7 * 3600, 19 * 3600, size=n)
    end_s = np.where(kind == 2, end * 86400 + rng.integers(8 * 3600, 18 * 3600, size=n),
                     start_s + rng.integers(600, 4 * 3600, size=n))
    ids = counters.take("visit_occurrence", n)
    cols = {
        "visit_occurrence_id": ids,
        "person_id": people.ids[who],
        "visit_concept_id": VISIT_CONCEPTS[kind],
        "visit_start_date": _days(start),
        "visit_start_datetime": start_s,
        "visit_end_date": _days(end),
        "visit_end_datetime": end_s,
        "visit_type_concept_id": np.full(n, EHR, dtype=np.int64),
        "care_site_id": rng.integers(1, CARE_SITES + 1, size=n),
        "visit_source_value": _strings(VISIT_SOURCE, kind),
    }
    offsets = np.concatenate(([0], np.cumsum(counts)))
    return cols, np.stack([offsets[:-1], counts])


def _link(rng: np.random.Generator, people: _People, who: np.ndarray, visits: Columns,
          vinfo: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Attach about 80 % of events to one of the person's visits (taking its date)."""
    offset, nvis = vinfo[0][who], vinfo[1][who]
    linked = (nvis > 0) & (rng.random(len(who)) < 0.8)
    vidx = offset + (rng.random(len(who)) * np.maximum(nvis, 1)).astype(np.int64)
    vidx = np.where(linked, vidx, 0)
    vid = visits["visit_occurrence_id"]
    vstart = visits["visit_start_date"]
    if len(vid) == 0:
        return (np.zeros(len(who), np.int64), np.ones(len(who), bool)), _in_period(
            rng, people, who)
    day = np.where(linked, vstart[vidx].astype(np.int64), _in_period(rng, people, who))
    return (vid[vidx], ~linked), day


def _conditions(rng: np.random.Generator, people: _People, visits: Columns, vinfo: np.ndarray,
                counters: _Counters) -> Columns:
    counts = _event_counts(rng, 3.0, people.age_factor, 1.5)
    who = np.repeat(np.arange(len(people.ids)), counts)
    n = len(who)
    code = rng.choice(len(CONDITIONS), size=n, p=zipf(len(CONDITIONS)))
    visit_id, day = _link(rng, people, who, visits, vinfo)
    has_end = rng.random(n) < 0.4
    end = day + rng.integers(1, 60, size=n)
    status = rng.choice(CONDITION_STATUS, size=n)
    return {
        "condition_occurrence_id": counters.take("condition_occurrence", n),
        "person_id": people.ids[who],
        "condition_concept_id": CONDITION_IDS[code],
        "condition_start_date": _days(day),
        "condition_start_datetime": day * 86400,
        "condition_end_date": (_days(end), ~has_end),
        "condition_type_concept_id": np.full(n, EHR, dtype=np.int64),
        "condition_status_concept_id": status,
        "visit_occurrence_id": visit_id,
        "condition_source_value": _strings(CONDITION_SOURCE, code),
    }


def _drugs(rng: np.random.Generator, people: _People, visits: Columns, vinfo: np.ndarray,
           counters: _Counters) -> Columns:
    counts = _event_counts(rng, 3.0, people.age_factor, 1.2)
    who = np.repeat(np.arange(len(people.ids)), counts)
    n = len(who)
    code = rng.choice(len(DRUGS), size=n, p=zipf(len(DRUGS)))
    visit_id, day = _link(rng, people, who, visits, vinfo)
    supply = _choice(rng, DAYS_SUPPLY, DAYS_SUPPLY_P, n)
    per_day = rng.choice(np.array([1, 1, 1, 2, 2, 3]), size=n)
    return {
        "drug_exposure_id": counters.take("drug_exposure", n),
        "person_id": people.ids[who],
        "drug_concept_id": DRUG_IDS[code],
        "drug_exposure_start_date": _days(day),
        "drug_exposure_start_datetime": day * 86400,
        "drug_exposure_end_date": _days(day + supply - 1),
        "drug_type_concept_id": np.full(n, EHR_PRESCRIPTION, dtype=np.int64),
        "refills": rng.choice(6, size=n, p=REFILLS_P).astype(np.int64),
        "quantity": (supply * per_day).astype(np.float64),
        "days_supply": supply.astype(np.int64),
        "route_concept_id": DRUG_ROUTE_IDS[code],
        "visit_occurrence_id": visit_id,
        "drug_source_value": _strings(DRUG_SOURCE, code),
        "route_source_value": _strings(DRUG_ROUTE_SOURCE, code),
    }


def _measurements(rng: np.random.Generator, people: _People, visits: Columns,
                  vinfo: np.ndarray, counters: _Counters) -> Columns:
    counts = _event_counts(rng, 10.0, people.age_factor, 1.5)
    who = np.repeat(np.arange(len(people.ids)), counts)
    n = len(who)
    code = rng.choice(len(MEASUREMENTS), size=n, p=zipf(len(MEASUREMENTS)))
    visit_id, day = _link(rng, people, who, visits, vinfo)
    mu, sigma = M_MU[code], M_SIGMA[code]
    value = np.exp(mu + sigma * rng.standard_normal(n))
    outlier = rng.random(n) < 0.002
    value = np.where(outlier, value * rng.uniform(5.0, 20.0, n), value)
    value = np.clip(np.round(value, 1), 0.0, MAX_VALUE)
    missing = rng.random(n) < 0.02
    low, high = M_LOW[code], M_HIGH[code]
    return {
        "measurement_id": counters.take("measurement", n),
        "person_id": people.ids[who],
        "measurement_concept_id": MEASUREMENT_IDS[code],
        "measurement_date": _days(day),
        "measurement_datetime": day * 86400 + rng.integers(7 * 3600, 19 * 3600, size=n),
        "measurement_type_concept_id": np.full(n, LAB, dtype=np.int64),
        "value_as_number": (value, missing),
        "unit_concept_id": M_UNIT[code],
        "range_low": (low, np.isnan(low)),
        "range_high": (high, np.isnan(high)),
        "visit_occurrence_id": visit_id,
        "measurement_source_value": _strings(MEASUREMENT_SOURCE, code),
        "unit_source_value": _strings(M_UNIT_SOURCE, code),
    }


def _chunk(seed: int, index: int, first_id: int, n: int,
           counters: _Counters) -> dict[str, tuple[Columns, int, float]]:
    """All tables for persons first_id..first_id+n-1: columns, row count, build seconds."""
    rng = np.random.default_rng([seed, index])
    out: dict[str, tuple[Columns, int, float]] = {}
    t0 = time.perf_counter()
    person, obs, death, people = _persons(rng, first_id, n)
    obs["observation_period_id"] = counters.take("observation_period", n)
    t1 = time.perf_counter()
    share = (t1 - t0) / 3
    out["person"] = (person, n, share)
    out["observation_period"] = (obs, n, share)
    out["death"] = (death, len(death["person_id"]), share)
    t0 = time.perf_counter()
    visits, vinfo = _visits(rng, people, counters)
    out["visit_occurrence"] = (visits, len(visits["person_id"]), time.perf_counter() - t0)
    builders: list[tuple[str, Callable[..., Columns]]] = [
        ("condition_occurrence", _conditions), ("drug_exposure", _drugs),
        ("measurement", _measurements)]
    for name, build in builders:
        t0 = time.perf_counter()
        cols = build(rng, people, visits, vinfo, counters)
        out[name] = (cols, len(cols["person_id"]), time.perf_counter() - t0)
    return out


def generate(out: Path, persons: int, *, seed: int = 0, fmt: Format = "csv",
             progress: bool = False) -> GenerateStats:
    """Write ``persons`` synthetic persons with their events into ``out`` (see module doc)."""
    if persons < 1:
        raise ValueError("persons must be at least 1")
    if fmt not in ("csv", "parquet"):
        raise ValueError("format must be csv or parquet")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stats = GenerateStats(persons=persons)
    specs = {name: table_spec(name) for name in TABLES}
    writers = {}
    for name in TABLES:
        path = out / f"{name}.{fmt}"
        writers[name] = _Writer(path, arrow_schema(specs[name]), fmt)
        stats.files[name] = path
        stats.rows[name] = 0
        stats.seconds[name] = 0.0
    counters = _Counters()
    try:
        with tqdm(total=persons, unit="persons", unit_scale=True, file=sys.stderr,
                  disable=not progress, desc="generating") as bar:
            for index, first in enumerate(range(0, persons, CHUNK_PERSONS)):
                n = min(CHUNK_PERSONS, persons - first)
                for name, (cols, rows, built) in _chunk(seed, index, first + 1, n,
                                                        counters).items():
                    t0 = time.perf_counter()
                    writers[name].write(_to_table(specs[name], cols, rows))
                    stats.seconds[name] += built + time.perf_counter() - t0
                    stats.rows[name] += rows
                bar.update(n)
        t0 = time.perf_counter()
        cols, rows = _concepts()
        writers["concept"].write(_to_table(specs["concept"], cols, rows))
        stats.seconds["concept"] = time.perf_counter() - t0
        stats.rows["concept"] = rows
    finally:
        for writer in writers.values():
            writer.close()
    write_declaration(out / "spe-metadata.yaml")
    stats.total_seconds = time.perf_counter() - started
    return stats


def declaration() -> dict[str, Any]:
    """The declaration the generator can vouch for (every row it writes satisfies it)."""
    events = {"year_lower": OBS_MIN.year, "year_upper": END.year}
    type_concepts = {"public_values": [EHR]}
    return {
        "version": 1,
        "tables": {
            "person": {"max_rows_per_person": 1, "columns": {
                "year_of_birth": {"lower": END.year - 99, "upper": END.year},
                "month_of_birth": {"lower": 1, "upper": 12},
                "day_of_birth": {"lower": 1, "upper": 28},
                "birth_datetime": {"year_lower": END.year - 99, "year_upper": END.year},
                "gender_concept_id": {"public_values": GENDER_CONCEPTS.tolist()},
                "race_concept_id": {"public_values": RACE_CONCEPTS.tolist()},
                "ethnicity_concept_id": {"public_values": ETHNICITY_CONCEPTS.tolist()},
                "gender_source_value": {"public_values": list(GENDER_SOURCE)},
            }},
            "observation_period": {"max_rows_per_person": 1, "columns": {
                "observation_period_start_date": events,
                "observation_period_end_date": events,
                "period_type_concept_id": type_concepts,
            }},
            "visit_occurrence": {"columns": {
                "visit_concept_id": {"public_values": VISIT_CONCEPTS.tolist()},
                "visit_start_date": events, "visit_end_date": {
                    "year_lower": OBS_MIN.year, "year_upper": END.year + 1},
                "visit_type_concept_id": type_concepts,
            }},
            "condition_occurrence": {"columns": {
                "condition_concept_id": {"public_values": CONDITION_IDS.tolist()},
                "condition_start_date": events,
                "condition_end_date": {"year_lower": OBS_MIN.year, "year_upper": END.year + 1},
                "condition_type_concept_id": type_concepts,
                "condition_status_concept_id": {
                    "public_values": CONDITION_STATUS.tolist()},
            }},
            "drug_exposure": {"columns": {
                "drug_concept_id": {"public_values": DRUG_IDS.tolist()},
                "drug_exposure_start_date": events,
                "drug_exposure_end_date": {"year_lower": OBS_MIN.year,
                                           "year_upper": END.year + 1},
                "drug_type_concept_id": {"public_values": [EHR_PRESCRIPTION]},
                "route_concept_id": {"public_values": sorted(set(DRUG_ROUTE_IDS.tolist()))},
                "quantity": {"lower": 0, "upper": float(DAYS_SUPPLY.max() * 3)},
                "days_supply": {"lower": int(DAYS_SUPPLY.min()),
                                "upper": int(DAYS_SUPPLY.max())},
                "refills": {"lower": 0, "upper": 5},
            }},
            "measurement": {"max_rows_per_person": 20, "columns": {
                "measurement_concept_id": {"public_values": MEASUREMENT_IDS.tolist()},
                "measurement_date": events,
                "measurement_type_concept_id": {"public_values": [LAB]},
                "value_as_number": {"lower": 0.0, "upper": MAX_VALUE},
                "unit_concept_id": {"public_values": sorted(set(M_UNIT.tolist()))},
                "range_low": {"lower": 0.0, "upper": MAX_VALUE},
                "range_high": {"lower": 0.0, "upper": MAX_VALUE},
            }},
            "death": {"max_rows_per_person": 1, "columns": {
                "death_date": events,
                "death_type_concept_id": type_concepts,
                "cause_concept_id": {"public_values": CONDITION_IDS.tolist()},
            }},
        },
    }


def write_declaration(path: Path) -> None:
    """Write ``declaration()`` as YAML with a short header comment."""
    text = ("# DP metadata declared by the data holder (here: the synthetic generator).\n"
            "# Bounds are used for clamping; public values are released as group keys.\n")
    text += yaml.safe_dump(declaration(), sort_keys=False)
    path.write_text(text, encoding="utf-8")
