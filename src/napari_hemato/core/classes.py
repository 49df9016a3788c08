"""One class hierarchy per task: cell type -> subtype (or a flat list), Qt-free.

A task declares its classes as a :class:`ClassHierarchy` (see
:meth:`napari_hemato.tasks.base.Task.hierarchy`): the top-level *types* (a smear's
RBC, WBC and Platelets; a nucleus; a mitosis' normal / atypical / rejected) and,
for some types, their *subtypes* (the 11 white-cell classes of the WBC
classifier). Review, hotkeys, summaries and exports all read the same one:

- giving an object a subtype makes its type column (``cell_type``) that subtype's
  type, so it moves between the counts; giving it a type clears the subtype;
- "uncertain first" measures the margin at the deepest level a row has
  probabilities for (a red cell has no white-cell subtype probabilities);
- every class has a hotkey: :meth:`ClassHierarchy.key_banks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

UNASSIGNED = "unassigned"
#: class given to rejected detections (kept: they are hard negatives for training)
REJECTED = "rejected"
#: modifier of each bank of class hotkeys (digits 1-9, 0 and Minus in each)
BANK_MODIFIERS = ("Alt", "Control-Alt")
BANK_KEYS = tuple("1234567890") + ("Minus",)
#: coarse white-cell groups (the PBC paper's 8): a cell labelled with a group may be any member
WBC_GROUPS = {"NEU": ("SNE", "BNE"), "EO": ("EO",), "BA": ("BA",), "LY": ("LY",), "MO": ("MO",),
              "IG": ("MMY", "MY", "PMY"), "ERB": ("ERB",), "PLT": ("PLT",)}


def allowed_classes(labels, class_names) -> np.ndarray:
    """(n, len(class_names)) bool: the classes each label allows (a class, or a coarse group).

    Examples
    --------
    >>> allowed_classes(["NEU", "LY"], ["SNE", "BNE", "LY"]).astype(int).tolist()
    [[1, 1, 0], [0, 0, 1]]
    """
    names = list(class_names)
    out = np.zeros((len(labels), len(names)), bool)
    for i, label in enumerate(labels):
        members = (label,) if label in names else WBC_GROUPS.get(label)
        if members is None or not set(members) <= set(names):
            raise ValueError(f"{label!r} is neither a class ({', '.join(names)}) nor a group "
                             f"of them ({', '.join(WBC_GROUPS)})")
        out[i, [names.index(m) for m in members]] = True
    return out


@dataclass(frozen=True)
class ClassHierarchy:
    """Types and their subtypes.

    Parameters
    ----------
    types : tuple of str
        Top-level classes, in display order.
    subtypes : dict
        ``{type: (subtype, ...)}`` for the types that have subtypes.
    type_column : str, optional
        The table column holding an object's type (``cell_type`` for smears); None
        when the class alone says it (flat hierarchies).

    Examples
    --------
    >>> h = ClassHierarchy(("RBC", "WBC"), {"WBC": ("SNE", "LY")}, type_column="cell_type")
    >>> h.classes, h.type_of("LY"), h.type_of("RBC"), h.label("LY")
    (['RBC', 'WBC', 'SNE', 'LY'], 'WBC', 'RBC', 'WBC › LY')
    >>> h.key_banks()
    [['SNE', 'LY'], ['RBC', 'WBC']]
    """

    types: tuple[str, ...]
    subtypes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    type_column: str | None = None

    @classmethod
    def flat(cls, names) -> ClassHierarchy:
        """One level: every name is a type."""
        return cls(tuple(dict.fromkeys(str(n) for n in names)))

    @property
    def classes(self) -> list[str]:
        """Every class: the types, then every subtype."""
        return list(dict.fromkeys([*self.types, *self.all_subtypes]))

    @property
    def all_subtypes(self) -> list[str]:
        return [s for t in self.types for s in self.subtypes.get(t, ())]

    def type_of(self, name: str) -> str | None:
        """The type of a class (itself for a type; None for a class outside the hierarchy)."""
        if name in self.types:
            return name
        for t, subs in self.subtypes.items():
            if name in subs:
                return t
        return None

    def label(self, name: str) -> str:
        """``type › subtype`` for a subtype, the name itself for a type."""
        t = self.type_of(name)
        return f"{t} › {name}" if t is not None and t != name else name

    def levels(self) -> list[list[str]]:
        """Classes by level, top first: ``[types]`` or ``[types, subtypes]``."""
        return [list(self.types)] + ([self.all_subtypes] if self.all_subtypes else [])

    def key_banks(self, size: int = len(BANK_KEYS)) -> list[list[str]]:
        """Classes per hotkey bank (``size`` keys each): the subtypes first (the daily
        work of a differential), then the types; a long level fills several banks."""
        banks = []
        for level in reversed(self.levels()):
            banks += [level[k:k + size] for k in range(0, len(level), size)]
        return banks

    def hotkeys(self) -> dict[str, str]:
        """``{key: class}`` for every class: bank ``b``'s ``k``-th class on
        ``BANK_MODIFIERS[b]-BANK_KEYS[k]`` (Alt-1 … Alt-Minus, then Control-Alt-1 …)."""
        banks = self.key_banks()
        if len(banks) > len(BANK_MODIFIERS):
            raise ValueError(f"{len(self.classes)} classes do not fit {len(BANK_MODIFIERS)} "
                             f"banks of {len(BANK_KEYS)} hotkeys")
        return {f"{BANK_MODIFIERS[b]}-{BANK_KEYS[k]}": name
                for b, bank in enumerate(banks) for k, name in enumerate(bank)}

    def margins(self, table: pd.DataFrame) -> np.ndarray:
        """Top-2 probability margin of each row at the deepest level it has probabilities
        for (NaN probabilities are absent, not zero); the ``confidence`` when it has none.

        Examples
        --------
        >>> h = ClassHierarchy(("RBC", "WBC"), {"WBC": ("SNE", "LY")})
        >>> t = pd.DataFrame({"prob_RBC": [0.9, 0.1], "prob_WBC": [0.1, 0.9],
        ...                   "prob_SNE": [np.nan, 0.55], "prob_LY": [np.nan, 0.45]})
        >>> h.margins(t).round(2).tolist()
        [0.8, 0.1]
        """
        n = len(table)
        out = np.full(n, np.nan)
        for level in self.levels():  # deeper levels overwrite where they have values
            cols = [f"prob_{c}" for c in level if f"prob_{c}" in table]
            if not cols:
                continue
            p = table[cols].to_numpy(float)
            has = np.isfinite(p).any(axis=1)
            p = np.sort(np.where(np.isfinite(p), p, -np.inf), axis=1)[:, ::-1]
            top = p[:, 0]
            second = np.where(np.isfinite(p[:, 1]), p[:, 1], 0.0) if p.shape[1] > 1 else 0.0
            out[has] = (top - second)[has]
        if "confidence" in table:
            conf = table["confidence"].to_numpy(float)
            out = np.where(np.isfinite(out), out, conf)
        return out
