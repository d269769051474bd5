"""What every attachment must pass before it is stored: a filename that is safe to send, a content
type that matches the content, and no executables or scripts.

Executables and scripts are refused in three ways, each lifted on its own by an entry in
MAILQUEUE_ATTACHMENT_ALLOWED_TYPES:

- by the filename's last extension (".exe", also in "invoice.pdf.exe"): DANGEROUS_EXTENSIONS, lifted
  by the extension (".exe");
- by the declared content type (application/x-msdownload, text/javascript, ...): lifted by that type;
- by the content: Windows (PE/MZ), Linux (ELF) and macOS (Mach-O) programs and Java classes, whatever
  the file is called; lifted by the type named in the refusal (application/x-msdownload,
  application/x-executable, application/x-mach-binary, application/java-vm).

DANGEROUS_EXTENSIONS follows the lists of file types that Gmail and Outlook block: a receiver that meets
one refuses or strips the whole message, so sending it wastes the attempt, and each of them runs code,
installs something or mounts a drive when opened:

- programs and libraries: .exe .com .scr .pif .dll .cpl .ocx .sys .drv .vxd .ex_ .xll .msc .gadget .app
  .appimage .run .elf .jar .class .jnlp
- installers and setup files: .msi .msp .mst .msu .msix .msixbundle .appx .appxbundle .application
  .appref-ms .xbap .cab .diagcab .diagcfg .diagpack .apk .pkg .mpkg .inf .ins .isp
- scripts: .bat .cmd .js .jse .vbs .vbe .vb .wsf .wsh .ws .wsc .sct .hta .chm .hlp .shb .shs .nsh .reg
  .ps1 .psm1 .psd1 .ps1xml .ps2 .ps2xml .psc1 .psc2 .msh .msh1 .msh2 .mshxml .msh1xml .msh2xml
  .sh .bash .csh .ksh .zsh .command
- shortcuts: .lnk .url .website .scf .settingcontent-ms
- disk images: .iso .img .vhd .vhdx .dmg
- Access programs: .ade .adp .mde .accde

Files inside archives are not looked at: a .zip holding an .exe passes (Gmail refuses it anyway).
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from collections.abc import Collection

import filetype

from mailqueue.message import BIDI_CONTROLS


class AttachmentRefused(ValueError):
    """Why one attachment is refused, in words that name the file (the API answers 422 with it)."""


# filetype reads no further than this (filetype.utils._NUM_SIGNATURE_BYTES).
SNIFF_BYTES = 8192

OCTET_STREAM = "application/octet-stream"
_ALLOWED_SETTING = "MAILQUEUE_ATTACHMENT_ALLOWED_TYPES"

# The module docstring lists them by kind; the kind names the file in a refusal.
_DANGEROUS_KINDS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (kind, frozenset(extensions.split()))
    for kind, extensions in (
        ("an executable", ".exe .com .scr .pif .dll .cpl .ocx .sys .drv .vxd .ex_ .xll .msc .gadget .app .appimage "
                          ".run .elf .jar .class .jnlp"),
        ("an installer", ".msi .msp .mst .msu .msix .msixbundle .appx .appxbundle .application .appref-ms .xbap "
                         ".cab .diagcab .diagcfg .diagpack .apk .pkg .mpkg .inf .ins .isp"),
        ("a script", ".bat .cmd .js .jse .vbs .vbe .vb .wsf .wsh .ws .wsc .sct .hta .chm .hlp .shb .shs .nsh .reg "
                     ".ps1 .psm1 .psd1 .ps1xml .ps2 .ps2xml .psc1 .psc2 .msh .msh1 .msh2 .mshxml .msh1xml .msh2xml "
                     ".sh .bash .csh .ksh .zsh .command"),
        ("a shortcut", ".lnk .url .website .scf .settingcontent-ms"),
        ("a disk image", ".iso .img .vhd .vhdx .dmg"),
        ("an Access program", ".ade .adp .mde .accde"),
    )
)

DANGEROUS_EXTENSIONS: frozenset[str] = frozenset().union(*(extensions for _, extensions in _DANGEROUS_KINDS))


# --- filenames ----------------------------------------------------------------------------------

_MAX_FILENAME_BYTES = 255  # what ext4, NTFS and APFS take in one name
_WINDOWS_REFUSED = re.compile(r'[<>:"|?*]')
# A name Windows opens as a device, whatever its extension: "nul.txt" is the null device.
_WINDOWS_DEVICE = re.compile(r"(?i)(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?")
_DRIVE = re.compile(r"^[A-Za-z]:")
_SURROUNDING = re.compile(r"^[\s.]+|[\s.]+$")
# An extension worth keeping when a name is shortened: ".pdf", ".tar", not ". Smith and sons".
_KEPT_EXTENSION = re.compile(r"\.[^.\s]{1,20}$")


def _is_unsafe_character(ch: str) -> bool:
    # Control characters (CR, LF, TAB, NUL, DEL, C1), the Unicode line and paragraph separators,
    # bidirectional overrides that make "Invoice<RLO>fdp.exe" show as "Invoiceexe.pdf", and lone
    # surrogates, which no encoding can write.
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in BIDI_CONTROLS


def _last_path_part(name: str) -> str:
    return _DRIVE.sub("", re.split(r"[/\\]", name)[-1])


def _shortened(name: str) -> str:
    """`name` cut to _MAX_FILENAME_BYTES of UTF-8, its extension kept, never splitting a character."""
    if len(name.encode()) <= _MAX_FILENAME_BYTES:
        return name
    kept = _KEPT_EXTENSION.search(name)
    extension = kept.group() if kept else ""
    budget = _MAX_FILENAME_BYTES - len(extension.encode())
    stem = name[: len(name) - len(extension)].encode()[:budget].decode(errors="ignore")
    return _SURROUNDING.sub("", stem) + extension


def clean_filename(name: str) -> str:
    """The filename as it will be sent: path parts dropped (both / and \\, and a leading drive like C:),
    control characters (incl. CR, LF, TAB, NUL), Unicode line/paragraph separators and bidirectional
    override/isolate characters removed, characters Windows refuses (<>:"|?*) replaced by _, surrounding
    whitespace and dots trimmed, NFC-normalised, at most 255 UTF-8 bytes (shortened keeping the extension).
    Names Windows reserves for devices (CON, NUL, COM1, ...) get a leading _. Raises AttachmentRefused
    when nothing usable is left (empty, ".", "..")."""
    text = unicodedata.normalize("NFC", "".join(ch for ch in name if not _is_unsafe_character(ch)))
    text = _SURROUNDING.sub("", _WINDOWS_REFUSED.sub("_", _last_path_part(text)))
    if _WINDOWS_DEVICE.fullmatch(text):
        text = "_" + text
    text = _shortened(text)
    if not text:
        raise AttachmentRefused(
            f"filename {name!r} has nothing left once path parts, unsafe characters and surrounding dots are removed"
        )
    return text


# --- content ids --------------------------------------------------------------------------------

_CONTENT_ID_MAX = 250
# Angle brackets are ours to add; quotes, backslashes and parentheses would be read as quoting or
# comments by the programs that parse the header, so the id the HTML names would not match.
_CONTENT_ID_REFUSED = frozenset('<>"\'\\()')


def content_id_problem(cid: str) -> str | None:
    """Why `cid` cannot be a Content-ID (None: it can): 1..250 printable ASCII chars without spaces,
    no <, >, quotes, backslash or parentheses (we add the <> ourselves)."""
    if not cid:
        return "content_id is empty"
    if len(cid) > _CONTENT_ID_MAX:
        return f"content_id is longer than {_CONTENT_ID_MAX} characters"
    for ch in cid:
        if not "!" <= ch <= "~":
            return f"content_id {cid!r} holds {ch!r}: only printable ASCII characters without spaces are allowed"
        if ch in _CONTENT_ID_REFUSED:
            return f"content_id {cid!r} holds {ch!r}; give the id without <> and without quotes, backslashes or parentheses"
    return None


# --- content types: spellings and families ------------------------------------------------------

# Other spellings of one type, mapped to the registered (or most common) one, so that "image/jpg"
# agrees with a JPEG and allowing "application/javascript" also allows "text/javascript".
_ALIASES = {
    "image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png",
    "image/x-icon": "image/vnd.microsoft.icon", "image/ico": "image/vnd.microsoft.icon",
    "image/x-ms-bmp": "image/bmp", "image/x-bmp": "image/bmp",
    "image/x-photoshop": "image/vnd.adobe.photoshop", "image/vnd.ms-photo": "image/jxr",
    "audio/x-wav": "audio/wav", "audio/wave": "audio/wav", "audio/vnd.wave": "audio/wav",
    "audio/mp3": "audio/mpeg", "audio/mpeg3": "audio/mpeg", "audio/x-mpeg-3": "audio/mpeg",
    "audio/x-flac": "audio/flac", "audio/x-aiff": "audio/aiff", "audio/x-midi": "audio/midi",
    "audio/sp-midi": "audio/midi", "audio/x-aac": "audio/aac", "audio/x-m4a": "audio/mp4", "audio/m4a": "audio/mp4",
    "video/x-m4v": "video/mp4", "video/avi": "video/x-msvideo", "video/msvideo": "video/x-msvideo",
    "application/x-zip-compressed": "application/zip", "application/x-zip": "application/zip",
    "application/x-gzip": "application/gzip", "application/x-rar-compressed": "application/vnd.rar",
    "application/x-rar": "application/vnd.rar", "application/x-bzip": "application/x-bzip2",
    "application/x-zstd": "application/zstd", "text/rtf": "application/rtf", "application/x-rtf": "application/rtf",
    "application/x-pdf": "application/pdf", "application/x-sqlite3": "application/vnd.sqlite3",
    "application/x-shockwave-flash": "application/vnd.adobe.flash.movie",
    "application/font-woff": "font/woff", "application/x-font-woff": "font/woff", "application/font-sfnt": "font/sfnt",
    "application/x-font-ttf": "font/ttf", "application/x-font-otf": "font/otf",
    "application/x-deb": "application/vnd.debian.binary-package",
    "application/x-debian-package": "application/vnd.debian.binary-package",
    # executables and scripts
    "application/x-msdos-program": "application/x-msdownload", "application/x-dosexec": "application/x-msdownload",
    "application/vnd.microsoft.portable-executable": "application/x-msdownload",
    "application/x-ms-dos-executable": "application/x-msdownload", "application/x-winexe": "application/x-msdownload",
    "application/x-exe": "application/x-msdownload", "application/exe": "application/x-msdownload",
    "application/x-elf": "application/x-executable", "application/x-sharedlib": "application/x-executable",
    "application/x-pie-executable": "application/x-executable",
    "application/x-mach-o-executable": "application/x-mach-binary",
    "application/x-java-archive": "application/java-archive", "application/x-jar": "application/java-archive",
    "application/x-java-class": "application/java-vm",
    "application/javascript": "text/javascript", "application/x-javascript": "text/javascript",
    "application/ecmascript": "text/javascript", "text/ecmascript": "text/javascript",
    "text/x-javascript": "text/javascript", "text/jscript": "text/javascript",
    "application/x-vbscript": "text/vbscript", "text/x-vbscript": "text/vbscript",
    "text/x-sh": "application/x-sh", "application/x-shellscript": "application/x-sh",
    "text/x-shellscript": "application/x-sh", "text/x-csh": "application/x-csh",
    "application/bat": "application/x-bat", "application/x-msdos-batch": "application/x-bat",
    "application/x-msi": "application/x-ms-installer", "application/x-windows-installer": "application/x-ms-installer",
}

# Types that run code, install something or mount a drive when opened (after _ALIASES).
_DANGEROUS_TYPES = frozenset({
    "application/x-msdownload", "application/x-executable", "application/x-mach-binary",
    "application/java-archive", "application/java-vm", "application/x-java-jnlp-file",
    "text/javascript", "text/vbscript", "application/x-sh", "application/x-csh", "application/x-bat",
    "application/x-powershell", "application/hta", "application/x-ms-installer", "application/x-ms-shortcut",
    "application/x-mswinurl", "application/x-ms-application", "application/x-ms-xbap",
    "application/vnd.android.package-archive", "application/x-apple-diskimage", "application/x-iso9660-image",
})

# Formats that are ZIP archives inside: the sniffer may call them application/zip. Types ending in
# "+zip" (application/epub+zip) are ZIP-based as well.
_ZIP_BASED = frozenset({
    "application/zip",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.template",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.template",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.openxmlformats-officedocument.presentationml.template",
    "application/vnd.openxmlformats-officedocument.presentationml.slideshow",
    "application/vnd.ms-word.document.macroenabled.12", "application/vnd.ms-excel.sheet.macroenabled.12",
    "application/vnd.ms-powerpoint.presentation.macroenabled.12",
    "application/vnd.oasis.opendocument.text", "application/vnd.oasis.opendocument.spreadsheet",
    "application/vnd.oasis.opendocument.presentation", "application/vnd.oasis.opendocument.graphics",
    "application/vnd.ms-xpsdocument", "application/oxps", "application/vnd.ms-visio.drawing",
    "application/vnd.google-earth.kmz", "model/3mf", "application/java-archive",
    "application/vnd.android.package-archive", "application/x-xpinstall",
})

# Formats whose files the sniffer may name by a sibling: one container, several kinds of content.
_FAMILIES = (
    frozenset({"image/png", "image/apng"}),  # an animated PNG is a PNG
    frozenset({"image/heic", "image/heif", "image/heic-sequence", "image/heif-sequence"}),
    frozenset({"video/mp4", "audio/mp4", "video/3gpp", "audio/3gpp", "video/3gpp2", "audio/3gpp2"}),
    frozenset({"audio/ogg", "video/ogg", "application/ogg", "audio/opus"}),
    frozenset({"video/x-matroska", "audio/x-matroska", "video/webm", "audio/webm"}),
    frozenset({"font/ttf", "font/otf", "font/sfnt", "font/collection"}),
    frozenset({"font/woff", "font/woff2"}),  # filetype 1.2 calls WOFF2 application/font-woff
    frozenset({"application/gzip", "application/x-tgz", "application/x-compressed-tar"}),
    # Office 97-2003 files share one compound-file container, and the sniffer tells them apart by guesswork.
    frozenset({"application/msword", "application/vnd.ms-excel", "application/vnd.ms-powerpoint",
               "application/vnd.ms-outlook", "application/vnd.visio", "application/x-ole-storage"}),
)

# Types whose files always start with a signature the sniffer knows: content it does not recognise
# is not such a file. Others (audio, video, Office 97-2003) have variants it misses.
_SIGNATURES = {
    "image/png": "a PNG image", "image/jpeg": "a JPEG image", "image/gif": "a GIF image", "image/webp": "a WebP image",
    "image/bmp": "a BMP image", "image/tiff": "a TIFF image", "application/pdf": "a PDF document",
    "application/gzip": "a gzip file", "application/x-bzip2": "a bzip2 file", "application/x-xz": "an xz file",
    "application/zstd": "a Zstandard file", "application/x-7z-compressed": "a 7-Zip archive",
    "application/vnd.rar": "a RAR archive", "audio/flac": "a FLAC file", "audio/wav": "a WAV file",
}

# The only formats the sniffer knows that are text: other verdicts on text come from short magic
# numbers that ordinary words begin with ("BM" is a BMP, "MZ" a Windows program, "ID3" an MP3).
_TEXT_FORMATS = frozenset({"application/pdf", "application/postscript", "application/rtf"})
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")

# Mach-O (32/64-bit, either byte order) and universal binaries, which the sniffer does not know.
# Java classes share the universal binaries' magic number; see _program_signature.
_MACH_O = frozenset({b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbf"})
_CAFEBABE = b"\xca\xfe\xba\xbe"

# Common attachment types missing from Python's own table of extensions.
_MORE_EXTENSIONS = {
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".dotx": "application/vnd.openxmlformats-officedocument.wordprocessingml.template",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".xltx": "application/vnd.openxmlformats-officedocument.spreadsheetml.template",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".potx": "application/vnd.openxmlformats-officedocument.presentationml.template",
    ".ppsx": "application/vnd.openxmlformats-officedocument.presentationml.slideshow",
    ".docm": "application/vnd.ms-word.document.macroenabled.12", ".xlsm": "application/vnd.ms-excel.sheet.macroenabled.12",
    ".pptm": "application/vnd.ms-powerpoint.presentation.macroenabled.12",
    ".odt": "application/vnd.oasis.opendocument.text", ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".odp": "application/vnd.oasis.opendocument.presentation", ".odg": "application/vnd.oasis.opendocument.graphics",
    ".epub": "application/epub+zip", ".xps": "application/vnd.ms-xpsdocument", ".oxps": "application/oxps",
    ".vsdx": "application/vnd.ms-visio.drawing", ".kmz": "application/vnd.google-earth.kmz", ".3mf": "model/3mf",
    ".msg": "application/vnd.ms-outlook", ".rtf": "application/rtf", ".webp": "image/webp", ".apng": "image/apng",
    ".psd": "image/vnd.adobe.photoshop", ".ics": "text/calendar", ".md": "text/markdown", ".yaml": "application/yaml",
    ".yml": "application/yaml", ".log": "text/plain", ".7z": "application/x-7z-compressed", ".rar": "application/vnd.rar",
    ".zst": "application/zstd", ".flac": "audio/flac", ".ogg": "audio/ogg", ".oga": "audio/ogg", ".ogv": "video/ogg",
    ".m4a": "audio/mp4", ".m4v": "video/mp4", ".mkv": "video/x-matroska", ".mid": "audio/midi", ".midi": "audio/midi",
    ".wmv": "video/x-ms-wmv", ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
    ".jar": "application/java-archive", ".apk": "application/vnd.android.package-archive",
}


def _guesser() -> mimetypes.MimeTypes:
    """Python's own table rather than the host's /etc/mime.types, so every host guesses alike, with
    the common attachment types it lacks."""
    guesser = mimetypes.MimeTypes()
    for extension, ctype in _MORE_EXTENSIONS.items():
        guesser.add_type(ctype, extension)
    return guesser


_GUESSER = _guesser()
# What a file named ".gz" (".tar.gz", ".csv.gz") is: the type mimetypes gives is the unpacked content's.
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
               "compress": "application/x-compress", "br": "application/x-brotli"}


def _canonical(ctype: str) -> str:
    low = ctype.lower()
    return _ALIASES.get(low, low)


def _zip_based(ctype: str) -> bool:
    return ctype in _ZIP_BASED or ctype.endswith("+zip")


def _agree(expected: str, sniffed: str) -> bool:
    if expected == sniffed or any(expected in f and sniffed in f for f in _FAMILIES):
        return True
    # ZIP-based formats are ZIP archives; when the sniffer names the format, it must be the same one.
    return (_zip_based(expected) and sniffed == "application/zip") or (expected == "application/zip" and _zip_based(sniffed))


# --- content types: the checks ------------------------------------------------------------------

# RFC 6838 section 4.2: restricted-name = 1*127 restricted-name-chars, starting with a letter or digit.
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(rf"({_RESTRICTED_NAME})/({_RESTRICTED_NAME})")


def _extension(filename: str) -> str:
    # Windows drops trailing dots and spaces, so "setup.exe. " opens as setup.exe.
    base = re.split(r"[/\\]", filename)[-1].rstrip(". \t\r\n")
    dot = base.rfind(".")
    return base[dot:].lower() if dot >= 0 else ""


def _declared(filename: str, declared: str) -> str:
    """The declared type, lower-cased and in its usual spelling. Parameters (charset, name) are
    dropped: the file is sent as bytes, and its name travels in Content-Disposition."""
    bare = declared.split(";", 1)[0].strip()
    if not _MEDIA_TYPE.fullmatch(bare):
        raise AttachmentRefused(f"file {filename!r} has content_type {declared!r}, which is not a type/subtype")
    if bare.lower().startswith("multipart/"):
        raise AttachmentRefused(f"file {filename!r} has content_type {declared!r}: a multipart type cannot be a file's type")
    return _canonical(bare)


def _program_signature(head: bytes) -> str | None:
    magic = head[:4]
    if magic in _MACH_O:
        return "application/x-mach-binary"
    if magic == _CAFEBABE and len(head) >= 8:
        # A universal binary counts its architectures next (a handful); a Java class gives its
        # version there (major 45 or more), as file(1) tells them apart.
        return "application/x-mach-binary" if int.from_bytes(head[4:8], "big") < 45 else "application/java-vm"
    return None


def _sniffed(head: bytes) -> str | None:
    """The type the content shows, or None when it shows none the sniffer knows."""
    head = bytes(head[:SNIFF_BYTES])
    program = _program_signature(head)
    if program is not None:
        return program
    kind = filetype.guess(head)
    if kind is None or kind.mime == OCTET_STREAM:  # filetype calls EOT fonts octet-stream
        return None
    sniffed = _canonical(kind.mime)
    if sniffed not in _TEXT_FORMATS and not _BINARY_BYTES.search(head):
        return None
    return sniffed


def _guessed(filename: str) -> str | None:
    base = re.split(r"[/\\]", filename)[-1].replace(":", "_").rstrip(". \t\r\n")
    ctype, encoding = _GUESSER.guess_type(base, strict=True)
    if encoding is not None:
        return _COMPRESSED.get(encoding)
    return None if ctype is None or ctype == OCTET_STREAM else _canonical(ctype)


def _allowance(entry: str) -> str:
    """An operator's entry as the rules compare it: a type in its usual spelling, or an extension
    with its dot ("js" and ".JS" are ".js")."""
    low = entry.strip().lower()
    if "/" in low:
        return _canonical(low)
    return low if low.startswith(".") else "." + low


def _lifted(allowed: Collection[str]) -> frozenset[str]:
    return frozenset(_allowance(entry) for entry in allowed if entry.strip())


def _dangerous_kind(extension: str) -> str | None:
    for kind, extensions in _DANGEROUS_KINDS:
        if extension in extensions:
            return kind
    return None


def _refusal(filename: str, what: str, entry: str) -> AttachmentRefused:
    return AttachmentRefused(
        f"file {filename!r} {what}: executables and scripts are refused; "
        f"an operator can allow {entry} with {_ALLOWED_SETTING}"
    )


def _refuse_dangerous(filename: str, extension: str, declared: str | None, sniffed: str | None, lifted: frozenset[str]) -> None:
    kind = _dangerous_kind(extension)
    if kind is not None and extension not in lifted:
        raise _refusal(filename, f"is {kind} ({extension})", extension)
    if declared in _DANGEROUS_TYPES and declared not in lifted:
        raise _refusal(filename, f"is declared {declared}, a type of executable or script", declared)
    if sniffed in _DANGEROUS_TYPES and sniffed not in lifted:
        raise _refusal(filename, f"holds a program ({sniffed})", sniffed)


def _refuse_mismatch(filename: str, expected: str, sniffed: str | None, said: str) -> None:
    if sniffed is None:
        shape = _SIGNATURES.get(expected) or ("a ZIP archive" if _zip_based(expected) else None)
        if shape is not None:
            raise AttachmentRefused(f"file {filename!r} {said} but its content is not {shape}")
    elif not _agree(expected, sniffed):
        raise AttachmentRefused(f"file {filename!r} {said} but its content is {sniffed}")


def checked_type(filename: str, declared: str | None, head: bytes, *, allowed: Collection[str] = ()) -> str:
    """The content type to send the file with, or AttachmentRefused naming the file (`filename`).

    `head` is the file's first SNIFF_BYTES bytes (more are ignored). `declared` (the caller's
    content_type) must be type/subtype; it is lower-cased, its usual spelling is used (image/jpg ->
    image/jpeg) and all parameters are dropped. Without one, the type is guessed from the filename's
    extension (Python's own table), then from the content; otherwise application/octet-stream.

    The content must agree with the type: the same type or family (a .docx is a ZIP archive, an
    animated PNG a PNG), and content the sniffer does not recognise only for types without a fixed
    signature (text/plain yes, image/png no). A guessed type is held to the same rule. Declared
    application/octet-stream defers to the content. Executables and scripts are refused unless
    `allowed` (extensions and/or types, any case) lifts the rule that caught them: see the module
    docstring. A type guessed from an allowed extension is not checked again.
    """
    extension = _extension(filename)
    claimed = None if declared is None else _declared(filename, declared)
    sniffed = _sniffed(head)
    _refuse_dangerous(filename, extension, claimed, sniffed, _lifted(allowed))
    if claimed is None:
        guessed = _guessed(filename)
        if guessed is None:
            return sniffed or OCTET_STREAM
        _refuse_mismatch(filename, guessed, sniffed, f"is named like {guessed} ({extension})")
        return guessed
    if claimed == OCTET_STREAM:
        return sniffed or OCTET_STREAM
    _refuse_mismatch(filename, claimed, sniffed, f"is declared {claimed}")
    return claimed


ATTACHMENT_RULES = (
    "Attachments: filenames lose path parts, control and bidirectional-override characters (<>:\"|?* become _); "
    "the content type must match the content (application/octet-stream takes the sniffed type); executables, "
    "scripts, installers, shortcuts and disk images (by extension, declared type or content: .exe, .js, .vbs, "
    ".bat, .msi, .lnk, .iso, ...; see mailqueue/attachments.py) are refused unless the operator allows them."
)
