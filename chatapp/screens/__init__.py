"""The dialogs over the chat, one module per family: `picker` (models), `chat_list` (chats),
`chat_settings` (a chat's settings), `dialogs` (text, yes/no, help); `modal` is their base.

Dialogs return their answer with `dismiss`; what they change in place they tell the app
with a message (`ChatList.Renamed`, `ChatList.Deleted`), never by calling into it.
"""

from chatapp.screens.chat_list import ChatList, chat_date
from chatapp.screens.chat_settings import SAMPLING_FIELDS, ChatSettings
from chatapp.screens.dialogs import Confirm, HelpScreen, TextPrompt
from chatapp.screens.modal import Modal, shorten
from chatapp.screens.picker import (BASE_MODEL, ModelPicker, entry_detail, entry_status, readable_reason,
                                    scan_summary)

__all__ = ["BASE_MODEL", "SAMPLING_FIELDS", "ChatList", "ChatSettings", "Confirm", "HelpScreen", "Modal",
           "ModelPicker", "TextPrompt", "chat_date", "entry_detail", "entry_status", "readable_reason",
           "scan_summary", "shorten"]
